"""SIGTERM, SIGUSR1 and SIGINT to ``mf fit`` at any moment: while it builds its cache (before Lightning's own handlers
exist), and between steps with and without SLURM's variables (a fake ``scontrol`` records the requeue). Each ends
with one line, a documented exit status, no lock left, no stray ``hpc_ckpt``, and a resume that matches."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_support import run, state_of, tiny_run_args, write_corpus
from test_reliability import STEPS, SUBPROCESS_TIMEOUT, assert_same_weights, fit_command, run_fit, signal_at

SLOW_CACHE_BUILD = """
import sys, time
from mf_lightning.data.tokenizers import ByteTokenizer
encode = ByteTokenizer.encode_batch
ByteTokenizer.encode_batch = lambda self, texts: (time.sleep(0.5), encode(self, texts))[1]
sys.argv[0] = "mf"
from mf_lightning.__main__ import main
main()
"""
"""``mf`` whose byte tokenizer takes 0.5 s a batch (of 256 documents) (same cache): a cache build long enough to signal it."""
SLURM_VARIABLES = {
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NAME": "train",
    "SLURM_JOB_ID": "4711",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}


def locks_left(*folders: Path) -> list[Path]:
    return [path for folder in folders for path in folder.rglob("*.lock*")]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_while_mf_fit_builds_its_cache_is_one_line_no_lock_and_the_same_command_starts_afresh(
    tmp_path, signum
):
    corpus = write_corpus(tmp_path / "corpus", documents=1024, words=20)
    args = tiny_run_args(tmp_path / "run", corpus, **{"data.prepare_workers": 1}, max_steps=2)
    command = [sys.executable, "-c", SLOW_CACHE_BUILD, "fit", *args, "--ckpt_path", "last"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    cache, deadline = tmp_path / "run" / "cache", time.monotonic() + SUBPROCESS_TIMEOUT
    while not (cache.is_dir() and any(cache.rglob(".*.lock"))):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the cache build never started"
        time.sleep(0.01)
    time.sleep(0.3)
    process.send_signal(signum)
    _, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == (130 if signum == signal.SIGINT else 143), err[-3000:]
    assert f"mf: error: {signum.name} stopped mf fit before training started" in err
    assert "Traceback" not in err and err.count("mf: error:") == 1
    assert not locks_left(tmp_path / "run"), "every lock is released"
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    again = subprocess.run(command[:1] + ["-m", "mf_lightning", *command[3:]], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """(corpus, final weights) of the subprocess run that is never interrupted, started with ``--ckpt_path last``
    in a fresh folder: the one command for the first start and every restart."""
    root = tmp_path_factory.mktemp("uninterrupted")
    corpus = write_corpus(root / "corpus")
    finished = run_fit(fit_command(root, corpus, "--ckpt_path", "last"), timeout=SUBPROCESS_TIMEOUT)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return corpus, state_of(root / "checkpoints" / "last.ckpt")


def fake_scontrol(folder: Path) -> Path:
    """A folder holding an ``scontrol`` that records its arguments in ``scontrol.calls``."""
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "scontrol.calls"}\n')
    script.chmod(0o755)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("slurm", [False, True], ids=["plain", "slurm-with-scontrol"])
def test_sigusr1_between_steps_saves_last_exits_143_requeues_under_slurm_and_resume_matches(
    uninterrupted, tmp_path, monkeypatch, slurm
):
    corpus, expected = uninterrupted
    if slurm:
        for name, value in SLURM_VARIABLES.items():
            monkeypatch.setenv(name, value)
        scontrol = fake_scontrol(tmp_path / "bin")
        monkeypatch.setenv("PATH", f"{scontrol}{os.pathsep}{os.environ['PATH']}")
    root = tmp_path / "run"
    stopped = run_fit(fit_command(root, corpus, "--ckpt_path", "last", *signal_at(5, signal.SIGUSR1)))
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 143, output[-4000:]
    assert "SIGUSR1 received by rank 0 of 1: every rank stops after step 6 and saves" in output
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert not list(tmp_path.rglob("hpc_ckpt*")) and "Traceback" not in output
    assert not locks_left(root)
    if slurm:
        assert (scontrol / "scontrol.calls").read_text() == "requeue 4711\n"
        assert "requeued SLURM job 4711" in output
    else:
        assert "requeue" not in output
    for name in SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    resumed = run_fit(fit_command(root, corpus, "--ckpt_path", "last"), timeout=SUBPROCESS_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_weights(state_of(root / "checkpoints" / "last.ckpt"), expected)
    assert STEPS > 6


def test_ckpt_path_last_in_a_fresh_folder_starts_from_scratch_saying_so(tmp_path, caplog, recwarn):
    corpus = write_corpus(tmp_path / "corpus", documents=8, words=40)
    with caplog.at_level(logging.INFO):
        cli = run("fit", [*tiny_run_args(tmp_path / "run", corpus, max_steps=2), "--ckpt_path", "last"])
    checkpoints = tmp_path / "run" / "checkpoints"
    assert f"--ckpt_path last: {checkpoints} holds no last checkpoint yet; starting from scratch" in caplog.text
    assert not [warning for warning in recwarn if "no last checkpoint available" in str(warning.message)]
    assert cli.trainer.global_step == 2 and (checkpoints / "last.ckpt").is_file()
