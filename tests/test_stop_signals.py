"""SIGTERM, SIGUSR1 and SIGINT to ``mf fit`` at any moment: while it builds its cache (before Lightning's own handlers
exist), between steps with and without SLURM's variables (a fake ``scontrol`` records the requeue), in the middle of
a validation and while a checkpoint is being written (one process, and two DDP ranks). Each ends with one line, a
documented exit status, no lock left, no stray ``hpc_ckpt`` or staging file, and a resume that matches.

To signal at one moment, a test runs ``patched_mf``: ``mf`` with a patch applied first that slows (the cache build)
or pauses (a validation, a save) the run at that moment."""

from __future__ import annotations

import json
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
from test_reliability import (
    STEPS,
    SUBPROCESS_TIMEOUT,
    assert_same_weights,
    ddp_fit,
    fit_command,
    run_fit,
    signal_at,
)

from mf_lightning.lit.checkpoints import read_checkpoint

SLOW_CACHE_BUILD = """
import time
from mf_lightning.data.tokenizers import ByteTokenizer
encode = ByteTokenizer.encode_batch
ByteTokenizer.encode_batch = lambda self, texts: (time.sleep(0.5), encode(self, texts))[1]
"""
"""A patch making the byte tokenizer take 0.5 s a batch (of 256 documents) (same cache): a cache build long enough to
signal it."""
PAUSE = """
import os, time
from pathlib import Path

def pause(times=1):
    \"\"\"Writes this process's id to MARKER and waits until the test, having signalled, deletes it; ``times`` times.\"\"\"
    for _ in range(times):
        staged = MARKER.with_name(MARKER.name + ".new")
        staged.write_text(str(os.getpid()))
        os.replace(staged, MARKER)
        deadline = time.monotonic() + 600
        while MARKER.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
"""
"""The part of a pausing patch that waits for the test (``signal_when_paused``); the patch defines ``MARKER``."""
PAUSED_VALIDATION = """
from mf_lightning.lit import LanguageModel
validation_step = LanguageModel.validation_step

def paused_validation_step(self, batch, batch_idx):
    trainer = self.trainer
    if not trainer.sanity_checking and trainer.global_step == {step} and batch_idx == 0 and trainer.global_rank == {rank}:
        pause()
    return validation_step(self, batch, batch_idx)

LanguageModel.validation_step = paused_validation_step
"""
"""A patch pausing rank ``{rank}`` in the first batch of the validation after step ``{step}`` (of 2 batches: the
middle of it)."""
PAUSED_SAVE = """
import torch
save = torch.save

def paused_save(checkpoint, file, *args, **kwargs):
    name = os.path.basename(getattr(file, "name", ""))
    if name.startswith(".{target}") and isinstance(checkpoint, dict) and checkpoint.get("global_step") == {step}:
        pause({times})
    return save(checkpoint, file, *args, **kwargs)

torch.save = paused_save
"""
"""A patch pausing the write of the checkpoint whose name starts with ``{target}`` at step ``{step}``, ``{times}``
times, its staging file open (``mf_lightning.fs.atomic.partial_path``: ``.<name>.<host>-<pid>-<random>.partial``)."""

PAUSED_STOP_END = """
from lightning.pytorch.loggers import TensorBoardLogger
finalize = TensorBoardLogger.finalize

def paused_finalize(self, status):
    if status == "failed":
        pause()
    return finalize(self, status)

TensorBoardLogger.finalize = paused_finalize
"""
"""A patch pausing a stopped fit after its ``last.ckpt`` was saved, where Lightning closes the logs of the stopped run."""


def patched_mf(folder: Path, patch: str) -> list[str]:
    """``[python, program]``: ``mf`` with ``patch`` (Python source) run first, from a program file in ``folder``, so
    that the ranks Lightning launches (``python <program> ...``) run the patch too."""
    folder.mkdir(parents=True, exist_ok=True)
    program = folder / "patched_mf.py"
    program.write_text(f"{patch}\nfrom mf_lightning.__main__ import main\nmain()\n")
    return [sys.executable, str(program)]


def pausing(folder: Path, patch: str) -> tuple[list[str], Path]:
    """(``patched_mf`` of the pausing ``patch``, its marker file)."""
    marker = folder / "paused"
    return patched_mf(folder, f"{PAUSE}MARKER = Path({str(marker)!r})\n{patch}"), marker


def start(command: list[str]) -> subprocess.Popen:
    """Starts ``command`` (its output piped) as ``run_fit`` runs it."""
    tests = str(Path(__file__).parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def launched_rank(pid: int) -> int:
    """The process id of the rank that the process ``pid`` launched (Lightning's launcher: its one child)."""
    (child,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(child)


def signal_when_paused(process: subprocess.Popen, marker: Path, signums: list[int], launched: bool = False) -> None:
    """Sends each of ``signums`` once ``process`` pauses (``PAUSE``), to the paused process (to the rank it launched
    when ``launched``), then lets it go on."""
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    for signum in signums:
        while not marker.exists():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never paused"
            time.sleep(0.01)
        paused = int(marker.read_text())
        os.kill(launched_rank(paused) if launched else paused, signum)
        marker.unlink()


def staged_files(folder: Path) -> list[Path]:
    """What a writer left half-written in ``folder``: staging files and folders (``partial_path``)."""
    return [path for path in folder.rglob(".*") if ".partial" in path.name]


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
    command = [*patched_mf(tmp_path, SLOW_CACHE_BUILD), "fit", *args, "--ckpt_path", "last"]
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
    again = subprocess.run(command[:1] + ["-m", "mf_lightning", *command[2:]], capture_output=True, text=True, env=env)
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


BEST_AT_STEP_8 = [
    "--trainer.callbacks+",
    json.dumps({"class_path": "checkpoint_probes.ScriptedScore", "init_args": {"scores": [2.0, 1.0, *[3.0] * 4]}}),
    "--checkpoint.monitor",
    "probe/score",
    "--checkpoint.every_n_train_steps",
    "null",
]
"""CLI arguments making the validation at step 8 (of those every 4 steps) the best so far, and checkpointing only at
validations, so the best checkpoint is saved there (a periodic save at that step would come first and take it)."""


def assert_stopped_at_once(process: subprocess.Popen, err: str, root: Path, step: int) -> str:
    """A second SIGINT's stop: status 130, one line and no traceback, ``last.ckpt`` still the save of ``step``,
    no lock or staging file left; returns the line."""
    assert process.returncode == 130, err[-4000:]
    (line,) = [line for line in err.splitlines() if line.startswith("mf: error:")]
    assert line.startswith("mf: error: SIGINT stopped mf fit at once (a second SIGINT)") and "Traceback" not in err
    assert read_checkpoint(root / "checkpoints" / "last.ckpt")["global_step"] == step
    assert not locks_left(root) and not staged_files(root)
    return line


def assert_stopped_cleanly(stopped: subprocess.CompletedProcess, root: Path, signum: int, step: int) -> None:
    """``stopped`` ended with the documented status and one line naming ``signum``, and left ``last.ckpt`` whole at
    ``step``, no lock, no staging file and no ``hpc_ckpt``."""
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == (130 if signum == signal.SIGINT else 143), output[-4000:]
    assert output.count(f"{signum.name} received by rank ") == 1 and "Traceback" not in output
    assert f"saved {root / 'checkpoints' / 'last.ckpt'} at step {step}" in output
    assert read_checkpoint(root / "checkpoints" / "last.ckpt")["global_step"] == step
    assert not locks_left(root) and not staged_files(root) and not list(root.rglob("hpc_ckpt*"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("moment", "signum"),
    [("validation", signal.SIGUSR1), ("last.ckpt", signal.SIGTERM), ("best", signal.SIGINT), ("best", signal.SIGTERM)],
    ids=["SIGUSR1-mid-validation", "SIGTERM-saving-last", "SIGINT-saving-best", "SIGTERM-saving-best"],
)
def test_a_signal_mid_validation_or_mid_save_stops_after_the_next_step_saving_once_and_resume_matches(
    uninterrupted, tmp_path, moment, signum
):
    """The validation after step 8 is paused in its middle, or the save of ``last.ckpt`` or of the best checkpoint at
    step 8 with its staging file open: the signal is noted, the validation or save completes, every rank stops after
    the next step (9) and saves ``last.ckpt`` once; the best checkpoint of step 8 is whole."""
    corpus, expected = uninterrupted
    root = tmp_path / "run"
    patch = (
        PAUSED_VALIDATION.format(step=8, rank=0)
        if moment == "validation"
        else PAUSED_SAVE.format(target=moment, step=8, times=1)
    )
    program, marker = pausing(tmp_path, patch)
    probes = BEST_AT_STEP_8 if moment == "best" else []
    process = start([*program, *fit_command(root, corpus, "--ckpt_path", "last", *probes)[3:]])
    signal_when_paused(process, marker, [signum])
    out, err = process.communicate(timeout=4 * SUBPROCESS_TIMEOUT)
    stopped = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    assert_stopped_cleanly(stopped, root, signum, step=9)
    assert f"{signum.name} received by rank 0 of 1: every rank stops after step 9 and saves" in out + err
    if moment == "best":
        assert read_checkpoint(root / "checkpoints" / "best-step=8.ckpt")["global_step"] == 8
    resumed = run_fit(fit_command(root, corpus, "--ckpt_path", "last", *probes), timeout=SUBPROCESS_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_weights(state_of(root / "checkpoints" / "last.ckpt"), expected)


@pytest.mark.slow
def test_a_second_sigint_mid_save_stops_at_once_with_one_line_130_and_the_previous_last_resumes(
    uninterrupted, tmp_path
):
    """Ctrl-C twice while ``last.ckpt`` of step 8 is being written: the save is abandoned (its staging file removed),
    ``last.ckpt`` stays the whole checkpoint of step 6, and the run ends at once with status 130 and one line (it was
    Lightning's ``KeyboardInterrupt`` handling: status 1, the lost-rank status, and no line)."""
    corpus, expected = uninterrupted
    root = tmp_path / "run"
    program, marker = pausing(tmp_path, PAUSED_SAVE.format(target="last.ckpt", step=8, times=2))
    process = start([*program, *fit_command(root, corpus, "--ckpt_path", "last")[3:]])
    signal_when_paused(process, marker, [signal.SIGINT, signal.SIGINT])
    _, err = process.communicate(timeout=4 * SUBPROCESS_TIMEOUT)
    line = assert_stopped_at_once(process, err, root, 6)
    assert line.startswith("mf: error: SIGINT stopped mf fit at once (a second SIGINT), without saving this step; ")
    assert line.endswith("--ckpt_path last")
    resumed = run_fit(fit_command(root, corpus, "--ckpt_path", "last"), timeout=SUBPROCESS_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_weights(state_of(root / "checkpoints" / "last.ckpt"), expected)


@pytest.fixture(scope="module")
def ddp_uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """(corpus, final weights) of a 2-rank DDP run never interrupted, started with ``--ckpt_path last``."""
    root = tmp_path_factory.mktemp("ddp_uninterrupted")
    corpus = write_corpus(root / "corpus")
    finished = run_fit(ddp_fit(root, corpus, "--ckpt_path", "last"), timeout=SUBPROCESS_TIMEOUT)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return corpus, state_of(root / "checkpoints" / "last.ckpt")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("moment", "signum", "rank"),
    [("saving", signal.SIGTERM, 0), ("saving", signal.SIGUSR1, 1), ("validation", signal.SIGINT, 1)],
    ids=["SIGTERM-rank0-saving", "SIGUSR1-rank1-waiting-for-the-save", "SIGINT-rank1-mid-validation"],
)
def test_ddp_a_signal_mid_save_or_mid_validation_stops_both_ranks_after_the_next_step_and_resume_matches(
    ddp_uninterrupted, tmp_path, moment, signum, rank
):
    """Two DDP ranks. Rank 0 writes ``last.ckpt`` of step 4 (after its validation) while rank 1 waits for it: SIGTERM
    to the writer, or SIGUSR1 to the waiting rank; or SIGINT to rank 1 in the middle of that validation. Both stop
    after step 5 and save one agreed ``last.ckpt``."""
    corpus, expected = ddp_uninterrupted
    root = tmp_path / "run"
    if moment == "saving":
        patch = PAUSED_SAVE.format(target="last.ckpt", step=4, times=1)  # rank 0 writes the .ckpt files under DDP
    else:
        patch = PAUSED_VALIDATION.format(step=4, rank=rank)
    program, marker = pausing(tmp_path, patch)
    process = start([*program, *ddp_fit(root, corpus, "--ckpt_path", "last")[3:]])
    signal_when_paused(process, marker, [signum], launched=moment == "saving" and rank == 1)
    out, err = process.communicate(timeout=4 * SUBPROCESS_TIMEOUT)
    stopped = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    assert_stopped_cleanly(stopped, root, signum, step=5)
    assert f"{signum.name} received by rank {rank} of 2: every rank stops after step 5 and saves" in out + err
    assert sorted(path.name for path in (root / "checkpoints").glob("last*")) == ["last.ckpt"]
    resumed = run_fit(ddp_fit(root, corpus, "--ckpt_path", "last"), timeout=SUBPROCESS_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_weights(state_of(root / "checkpoints" / "last.ckpt"), expected)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_a_second_sigint_mid_save_stops_every_rank_at_once_and_the_previous_last_resumes(
    ddp_uninterrupted, tmp_path
):
    """Ctrl-C twice to rank 0 while it writes ``last.ckpt`` of step 4: it stops at once with one line and status 130,
    the rank it launched is stopped with it (not left waiting), and ``last.ckpt`` of step 2 resumes."""
    corpus, expected = ddp_uninterrupted
    root = tmp_path / "run"
    program, marker = pausing(tmp_path, PAUSED_SAVE.format(target="last.ckpt", step=4, times=2))
    process = start([*program, *ddp_fit(root, corpus, "--ckpt_path", "last")[3:]])
    signal_when_paused(process, marker, [signal.SIGINT, signal.SIGINT])
    _, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert_stopped_at_once(process, err, root, 2)
    resumed = run_fit(ddp_fit(root, corpus, "--ckpt_path", "last"), timeout=SUBPROCESS_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_weights(state_of(root / "checkpoints" / "last.ckpt"), expected)


@pytest.mark.slow
def test_a_signal_while_a_stopped_fit_finishes_after_its_save_changes_nothing(uninterrupted, tmp_path):
    """SIGUSR1 stops the fit after step 6 and ``last.ckpt`` is saved; a SIGTERM while the run then closes its logs
    (a scheduler's SIGTERM after its SIGUSR1) is only noted: one stop, no error line claiming nothing was saved."""
    corpus, _ = uninterrupted
    root = tmp_path / "run"
    program, marker = pausing(tmp_path, PAUSED_STOP_END)
    process = start([*program, *fit_command(root, corpus, "--ckpt_path", "last", *signal_at(5, signal.SIGUSR1))[3:]])
    signal_when_paused(process, marker, [signal.SIGTERM])
    out, err = process.communicate(timeout=4 * SUBPROCESS_TIMEOUT)
    stopped = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    assert_stopped_cleanly(stopped, root, signal.SIGUSR1, step=6)
    assert "mf: error:" not in err
