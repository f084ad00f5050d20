"""Reliability end to end: kills and SIGTERM lose nothing, hostile input fails clearly, numerics stay safe."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from cli_support import REPO, run, scalars, state_of, tiny_run_args, write_corpus

from mf_lightning.cli import main
from mf_lightning.kernels import embedding_bag, reference
from mf_lightning.lit import LanguageModel
from mf_lightning.lit.checkpoints import AtomicCheckpointIO, read_checkpoint
from mf_lightning.models import load_pretrained
from mf_lightning.nn import MemoryLayer

LIGHT = {"model.overrides": "{max_seq_len: 64, code_bits: 4}", "bucket_usage.image_every_n_steps": 1000}
STEPS = 24
SUBPROCESS_TIMEOUT = 300  # generous: a loaded 2-core machine runs these 24-step fits in up to ~3 minutes


def fit_command(root: Path, corpus: Path, *extra: str) -> list[str]:
    """``python -m mf_lightning fit`` of a small model saving ``last.ckpt`` every 2 steps (from validation at step 4)."""
    args = tiny_run_args(root, corpus, max_steps=STEPS, **LIGHT, **{"validation.every_n_steps": 4})
    return [sys.executable, "-m", "mf_lightning", "fit", *args, "--checkpoint.every_n_train_steps", "2", *extra]


def start_and_wait_for_last(root: Path, corpus: Path) -> subprocess.Popen:
    """Starts a fit and returns once its first ``last.ckpt`` exists (the process still running)."""
    process = subprocess.Popen(fit_command(root, corpus), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last, deadline = root / "checkpoints" / "last.ckpt", time.monotonic() + SUBPROCESS_TIMEOUT
    while not last.exists():
        assert process.poll() is None, f"the run ended before its first checkpoint:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    return process


def resume(root: Path, corpus: Path) -> dict[str, torch.Tensor]:
    """Reruns the same command with ``--ckpt_path last``; returns the final weights."""
    subprocess.run(
        fit_command(root, corpus, "--ckpt_path", "last"), check=True, capture_output=True, timeout=SUBPROCESS_TIMEOUT
    )
    return state_of(root / "checkpoints" / "last.ckpt")


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """(corpus, final weights) of the subprocess run that is never interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted")
    corpus = write_corpus(root / "corpus")
    subprocess.run(fit_command(root, corpus), check=True, capture_output=True, timeout=SUBPROCESS_TIMEOUT)
    return corpus, state_of(root / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    corpus, expected = uninterrupted
    process = start_and_wait_for_last(tmp_path, corpus)
    time.sleep(random.Random(5).uniform(0.0, 0.3))
    assert process.poll() is None, "the run finished before the kill; shorten the delay"
    process.kill()
    process.wait()
    killed_at = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert killed_at < STEPS
    assert_same_weights(resume(tmp_path, corpus), expected)


@pytest.mark.slow
def test_sigterm_saves_last_exits_143_and_resume_matches(uninterrupted, tmp_path):
    corpus, expected = uninterrupted
    process = start_and_wait_for_last(tmp_path, corpus)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == 143, output
    stopped_at = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert stopped_at < STEPS
    assert f"saved {tmp_path / 'checkpoints' / 'last.ckpt'} at step {stopped_at}" in output
    assert "Traceback" not in output
    assert_same_weights(resume(tmp_path, corpus), expected)


ACCUMULATED_STEPS = 8


def accumulated_fit(root: Path, corpus: Path, accumulate: int, *extra: str) -> list[str]:
    """``python -m mf_lightning fit`` under gradient accumulation, checkpointing every 2 optimizer steps."""
    args = tiny_run_args(
        root,
        corpus,
        max_steps=ACCUMULATED_STEPS,
        **LIGHT,
        **{"validation.every_n_steps": 2, "trainer.accumulate_grad_batches": accumulate},
    )
    return [sys.executable, "-m", "mf_lightning", "fit", *args, "--checkpoint.every_n_train_steps", "2", *extra]


def signal_at(batch: int, signum: int, rank: int | None = None) -> list[str]:
    """CLI arguments adding a ``SignalAt`` callback (tests/signal_support.py) to a subprocess fit, signalling the
    process of global rank ``rank`` (every process when None)."""
    init_args = {"batch": batch, "signum": int(signum), "rank": rank}
    return ["--trainer.callbacks+", json.dumps({"class_path": "signal_support.SignalAt", "init_args": init_args})]


def run_fit(command: list[str], timeout: float = 4 * SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    """Runs ``command`` with ``tests/`` importable (for ``signal_support``), one thread per process; returns the
    finished process."""
    tests = str(Path(__file__).parent)
    path = os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def uninterrupted_accumulated(tmp_path_factory) -> dict:
    """accumulate -> (corpus, final weights) of an uninterrupted accumulated run, computed once per value."""
    runs = {}

    def final_weights(accumulate: int) -> tuple[Path, dict[str, torch.Tensor]]:
        if accumulate not in runs:
            root = tmp_path_factory.mktemp(f"accumulate{accumulate}")
            corpus = write_corpus(root / "corpus")
            finished = run_fit(accumulated_fit(root, corpus, accumulate))
            assert finished.returncode == 0, finished.stdout + finished.stderr
            runs[accumulate] = corpus, state_of(root / "checkpoints" / "last.ckpt")
        return runs[accumulate]

    return final_weights


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("accumulate", [2, 4])
def test_a_signal_inside_an_accumulation_window_then_resume_matches(
    uninterrupted_accumulated, tmp_path, accumulate, signum
):
    corpus, expected = uninterrupted_accumulated(accumulate)
    rng = random.Random(f"{accumulate}-{signum}")
    batch = rng.randrange(2 * accumulate + 1, 6 * accumulate)
    batch -= batch % accumulate == accumulate - 1  # a batch that does not end its window
    interrupted = run_fit(accumulated_fit(tmp_path, corpus, accumulate, *signal_at(batch, signum)))
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    if signum == signal.SIGTERM:
        assert interrupted.returncode == 143, interrupted.stdout + interrupted.stderr
        assert saved == batch // accumulate + 1, "the save waits for the window's optimizer step"
    else:
        assert interrupted.returncode == -signal.SIGKILL and saved <= batch // accumulate
    resumed = run_fit(accumulated_fit(tmp_path, corpus, accumulate, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from a checkpoint that ended before the epoch ended" not in resumed.stdout + resumed.stderr
    assert_same_weights(state_of(tmp_path / "checkpoints" / "last.ckpt"), expected)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(run root, corpus) of one short in-process fit of the light MemoryFormer."""
    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "corpus")
    cli = run("fit", tiny_run_args(root, corpus, max_steps=4, **LIGHT))
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    return root, corpus


def fails_with(args: list[str], capsys, *messages: str) -> None:
    """``mf <args>`` ends with exit status 2 and one error line containing every one of ``messages``."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert all(message in err for message in messages), err
    assert "Traceback" not in err


def test_clean_runs_log_zero_skipped_steps(trained):
    assert {value for _, value in scalars(trained[0] / "tensorboard")["train/skipped_steps"]} == {0.0}


@pytest.mark.parametrize("where", ["file", "last"])
def test_truncated_checkpoint_is_a_clear_error(trained, tmp_path, where, capsys):
    root, corpus = trained
    good = (root / "checkpoints" / "last.ckpt").read_bytes()
    broken = tmp_path / "checkpoints" / "last.ckpt"
    broken.parent.mkdir()
    broken.write_bytes(good[: len(good) // 2])
    ckpt_path = str(broken) if where == "file" else "last"
    args = ["fit", *tiny_run_args(tmp_path, corpus, max_steps=4, **LIGHT), "--ckpt_path", ckpt_path]
    fails_with(args, capsys, f"checkpoint {broken} cannot be read")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.arch": "transformer"}, "arch='memoryformer' in the checkpoint, 'transformer' in the config"),
        ({"model.overrides": "{max_seq_len: 64, code_bits: 8}"}, "code_bits=4 in the checkpoint, 8 in the config"),
    ],
    ids=["other-arch", "other-sizes"],
)
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_checkpoint_of_another_model_is_refused(trained, tmp_path, overrides, message, subcommand, capsys):
    root, corpus = trained
    checkpoint = root / "checkpoints" / "last.ckpt"
    args = tiny_run_args(tmp_path, corpus, max_steps=4, **{**LIGHT, **overrides})
    args += ["--ckpt_path", str(checkpoint)]
    fails_with([subcommand, *args], capsys, f"checkpoint {checkpoint} holds another model", message)


class TouchOnLoad:
    """Unpickling this creates ``path``: a stand-in for a checkpoint that runs code when loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_checkpoints_that_would_run_code_are_refused(trained, tmp_path, capsys):
    root, corpus = trained
    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.ckpt"
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save({**checkpoint, "payload": TouchOnLoad(marker)}, hostile)
    args = ["fit", *tiny_run_args(tmp_path, corpus, max_steps=4, **LIGHT), "--ckpt_path", str(hostile)]
    fails_with(args, capsys, "mf does not unpickle such objects because that can run code")
    with pytest.raises(pickle.UnpicklingError):
        LanguageModel.load_from_checkpoint(hostile)
    assert not marker.exists()


def test_a_users_checkpoint_io_replaces_the_default(trained):
    root, corpus = trained
    plugin = '{"class_path": "mf_lightning.lit.checkpoints.AtomicCheckpointIO", "init_args": {"weights_only": false}}'
    cli = run("validate", tiny_run_args(root, corpus, **LIGHT) + ["--trainer.plugins", plugin, "--ckpt_path", "last"])
    assert cli.trainer.strategy.checkpoint_io.weights_only is False


@pytest.mark.parametrize("damage", ["truncated", "other-tokenizer"])
def test_damaged_token_cache_is_rebuilt_not_used(trained, damage, caplog):
    root, corpus = trained
    args = tiny_run_args(root, corpus, **LIGHT) + ["--ckpt_path", "last"]
    expected = run("validate", args).trainer.callback_metrics["loss/val"]
    (cache,) = (root / "cache" / "tokens").iterdir()
    if damage == "truncated":
        train = cache / "train.bin"
        train.write_bytes(train.read_bytes()[:100])
    else:
        manifest = cache / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"byte-v1"', '"hf-0123456789abcdef"'))
    with caplog.at_level(logging.WARNING):
        validated = run("validate", args).trainer.callback_metrics["loss/val"]
    assert f"rebuilding token cache {cache}" in caplog.text
    assert torch.equal(validated, expected)


def test_non_utf8_corpus_file_is_named(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    fails_with(["fit", *tiny_run_args(tmp_path, corpus)], capsys, f"text file {corpus / 'latin1.txt'} is not UTF-8")


@pytest.mark.parametrize(
    "yaml_text, key",
    [("model:\n  lr: fast\n", "model.lr"), ("non_finite:\n  max_consecutve: 3\n", "max_consecutve")],
    ids=["wrong-type", "unknown-key"],
)
def test_bad_yaml_names_the_key(tmp_path, yaml_text, key, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    assert key in capsys.readouterr().err


def test_a_diverging_run_stops_with_one_clear_line(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    args = tiny_run_args(tmp_path, corpus, max_steps=10, **LIGHT) + [
        "--model.lr",
        "1e30",
        "--non_finite.max_consecutive",
        "2",
    ]
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        fails_with(["fit", *args], capsys, "2 optimizer steps in a row")


def test_export_writes_a_safetensors_model_of_the_checkpoint(trained, tmp_path, capsys):
    checkpoint = trained[0] / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "model")])
    assert f"exported the model of {checkpoint} to {tmp_path / 'model'}" in capsys.readouterr().out
    model = load_pretrained(tmp_path / "model")
    assert model.config.code_bits == 4
    weights = {key.removeprefix("model."): value for key, value in state_of(checkpoint).items()}
    assert_same_weights(model.state_dict(), weights)
    (tmp_path / "cut.ckpt").write_bytes(checkpoint.read_bytes()[:1000])
    export_cut = ["export", "--ckpt_path", str(tmp_path / "cut.ckpt"), "--out", str(tmp_path / "x")]
    fails_with(export_cut, capsys, "cannot be read")


def test_export_refuses_a_non_empty_folder_unless_overwrite(trained, tmp_path, capsys):
    checkpoint = trained[0] / "checkpoints" / "last.ckpt"
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"another model")
    export = ["export", "--ckpt_path", str(checkpoint), "--out", str(out)]
    fails_with(export, capsys, f"--out {out} is not empty (model.safetensors)", "--overwrite")
    assert (out / "model.safetensors").read_bytes() == b"another model"
    main([*export, "--overwrite"])
    assert load_pretrained(out).config.code_bits == 4


def test_a_fresh_fit_refuses_a_folder_holding_a_runs_checkpoints(trained, capsys):
    root, corpus = trained
    before = {path: path.stat().st_mtime_ns for path in (root / "checkpoints").iterdir()}
    args = ["fit", *tiny_run_args(root, corpus, max_steps=4, **LIGHT)]
    fails_with(
        args,
        capsys,
        f"{root / 'checkpoints'} already holds checkpoints of a run (",
        "last.ckpt",
        "--ckpt_path last",
        "another --trainer.default_root_dir",
    )
    assert {path: path.stat().st_mtime_ns for path in (root / "checkpoints").iterdir()} == before


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_last_without_a_checkpoint_is_an_error(tmp_path, subcommand, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    args = [subcommand, *tiny_run_args(tmp_path, corpus, **LIGHT), "--ckpt_path", "last"]
    fails_with(args, capsys, f"--ckpt_path last: {tmp_path / 'checkpoints'} holds no last checkpoint to {subcommand}")


def test_sigterm_during_validate_exits_non_zero_with_a_message(trained, capsys):
    root, corpus = trained
    callback = '{"class_path": "signal_support.SignalAt", "init_args": {"batch": 0, "stage": "validation"}}'
    args = tiny_run_args(root, corpus, **LIGHT) + ["--ckpt_path", "last", "--trainer.callbacks+", callback]
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *args])
    assert exit_info.value.code == 143
    assert "mf: error: SIGTERM stopped validate before it finished; no results were reported" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["torch", "embedding_bag"])
def test_memory_layer_scores_and_table_gradients_stay_fp32_under_bf16_autocast(backend, monkeypatch):
    module = reference if backend == "torch" else embedding_bag
    score_dtypes = []

    def recording_scores(*args, **kwargs):
        scores = original(*args, **kwargs)
        score_dtypes.append(scores.dtype)
        return scores

    original = module.chunk_scores
    monkeypatch.setattr(module, "chunk_scores", recording_scores)
    layer = MemoryLayer(32, 16, code_bits=4, backend=backend)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.nn.functional.linear(x, torch.eye(32)))
    assert score_dtypes == [torch.float32]
    y.float().sum().backward()
    assert layer.tables.dtype == layer.tables.grad.dtype == torch.float32
    assert torch.isfinite(layer.tables.grad).all() and layer.tables.grad.abs().sum() > 0


def checkpoint_probes(root: Path, scores: list[float]) -> list[str]:
    """CLI arguments that monitor a scripted validation score and record what last.ckpt holds after each
    validation in ``root/last_after_validation.json`` (tests/checkpoint_probes.py)."""
    score = {"class_path": "checkpoint_probes.ScriptedScore", "init_args": {"scores": scores}}
    last = {
        "class_path": "checkpoint_probes.LastAfterValidation",
        "init_args": {"last": str(root / "checkpoints" / "last.ckpt"), "out": str(root / "last_after_validation.json")},
    }
    return [
        "--trainer.callbacks+",
        json.dumps(score),
        "--trainer.callbacks+",
        json.dumps(last),
        "--checkpoint.monitor",
        "probe/score",
    ]


WORSE_IN_THE_MIDDLE_AND_AT_THE_END = [1.0, 2.0, 0.5, 3.0]
"""Scores of the validations at steps 2, 4, 6, 8: the best is at step 6; steps 4 and 8 get worse."""


def assert_last_followed_every_validation(root: Path) -> None:
    assert json.loads((root / "last_after_validation.json").read_text()) == [[2, 2], [4, 4], [6, 6], [8, 8]]
    assert sorted(path.name for path in (root / "checkpoints").glob("*.ckpt")) == ["best-step=6.ckpt", "last.ckpt"]


def test_last_holds_every_validated_model_whatever_the_metric(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    args = tiny_run_args(tmp_path, corpus, max_steps=8, **LIGHT, **{"validation.every_n_steps": 2})
    cli = run("fit", args + checkpoint_probes(tmp_path, WORSE_IN_THE_MIDDLE_AND_AT_THE_END))
    assert_last_followed_every_validation(tmp_path)
    assert_same_weights(state_of(tmp_path / "checkpoints" / "last.ckpt"), cli.model.state_dict())


DDP_STEPS = 8


def ddp_fit(root: Path, corpus: Path, *extra: str, strategy: str = "ddp") -> list[str]:
    """``python -m mf_lightning fit`` on 2 CPU processes (gloo), validating every 2 steps."""
    settings = {
        "validation.every_n_steps": 2,
        "data.batch_size": 2,
        "trainer.accelerator": "cpu",
        "trainer.devices": 2,
        "trainer.strategy": strategy,
    }
    args = tiny_run_args(root, corpus, max_steps=DDP_STEPS, **LIGHT, **settings)
    return [sys.executable, "-m", "mf_lightning", "fit", *args, *extra]


FSDP_STRATEGY = json.dumps(yaml.safe_load((REPO / "configs" / "fsdp_base.yaml").read_text())["trainer"]["strategy"])


@pytest.fixture(scope="module")
def ddp_uninterrupted(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(run root, corpus, final weights) of a 2-rank DDP run never interrupted, monitoring a scripted score."""
    root = tmp_path_factory.mktemp("ddp_uninterrupted")
    corpus = write_corpus(root / "corpus")
    finished = run_fit(
        ddp_fit(root, corpus, *checkpoint_probes(root, WORSE_IN_THE_MIDDLE_AND_AT_THE_END)), timeout=SUBPROCESS_TIMEOUT
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    return root, corpus, state_of(root / "checkpoints" / "last.ckpt")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_last_holds_every_validated_model_whatever_the_metric(ddp_uninterrupted):
    root, _, _ = ddp_uninterrupted
    assert_last_followed_every_validation(root)
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == DDP_STEPS


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("rank", "signum"),
    [(0, signal.SIGTERM), (1, signal.SIGTERM), (None, signal.SIGTERM), (1, signal.SIGUSR1)],
    ids=["rank0", "rank1", "all-ranks", "SIGUSR1-rank1"],
)
def test_ddp_sigterm_on_any_rank_stops_every_rank_at_one_step_and_resume_matches(
    ddp_uninterrupted, tmp_path, rank, signum
):
    """SIGTERM (or SIGUSR1, which hung the job) at the start of micro-batch 3 on one or every rank: all stop after
    step 4, exit 143, save once."""
    _, corpus, expected = ddp_uninterrupted
    stopped = run_fit(ddp_fit(tmp_path, corpus, *signal_at(3, signum, rank)), timeout=SUBPROCESS_TIMEOUT)
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 143, output[-4000:]
    received = "0, 1" if rank is None else str(rank)
    assert f"{signum.name} received by rank {received} of 2: every rank stops after step 4 and saves" in output
    assert not list(tmp_path.rglob("hpc_ckpt*"))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert "Traceback" not in output
    resumed = run_fit(ddp_fit(tmp_path, corpus, "--ckpt_path", "last"), timeout=SUBPROCESS_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert sorted(path.name for path in (tmp_path / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
    assert_same_weights(state_of(tmp_path / "checkpoints" / "last.ckpt"), expected)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("killed", "survivor", "culprit", "statuses"),
    [
        (1, 0, r"rank 1 \(process \d+\) was killed by SIGKILL", (1,)),
        (0, 1, r"rank 0 \(process \d+, which started this one\) is gone", (-signal.SIGKILL,)),
    ],
    ids=["rank1-killed", "rank0-killed"],
)
def test_ddp_a_lost_rank_is_one_line_on_the_survivor_naming_it_and_the_resume_command(
    ddp_uninterrupted, tmp_path, killed, survivor, culprit, statuses
):
    """The status seen is rank 0's: 1 from mf, which outlives the launcher's observer of the ranks it started
    (Lightning's killed it within 5 s of rank 1's death, sometimes before the line: PatientChildObserver)."""
    _, corpus, _ = ddp_uninterrupted
    result = run_fit(ddp_fit(tmp_path, corpus, *signal_at(3, signal.SIGKILL, rank=killed)), timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode in statuses, result.stderr[-4000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("mf: error:")]
    assert re.match(
        rf"mf: error: rank {survivor} of 2 stopped: {culprit}; resume every rank from the last checkpoint with: "
        r"mf fit --config .* --ckpt_path last$",
        line,
    ), line
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_of_two_runs_started_at_once_in_one_folder_one_is_refused_before_writing(tmp_path):
    """The winner trains until it is stopped, so the folder is still claimed however late the other process gets
    to its check (on a loaded machine a short run could finish first, and the late one is then refused for the
    checkpoints it finds instead)."""
    corpus = write_corpus(tmp_path / "corpus")
    root = tmp_path / "run"
    args = tiny_run_args(root, corpus, max_steps=1_000_000, **LIGHT)
    command = [sys.executable, "-m", "mf_lightning", "fit", *args, "--checkpoint.every_n_train_steps", "2"]
    logs = [tmp_path / f"run{index}.log" for index in range(2)]
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w")) for log in logs]
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    try:
        while all(process.poll() is None for process in processes):
            assert time.monotonic() < deadline, "neither run was refused"
            time.sleep(0.05)
        refused = next(index for index, process in enumerate(processes) if process.poll() is not None)
        winner, loser = processes[1 - refused], logs[refused]
        assert processes[refused].returncode == 2, loser.read_text()[-2000:]
        last = root / "checkpoints" / "last.ckpt"
        while not last.exists():
            assert winner.poll() is None and time.monotonic() < deadline, logs[1 - refused].read_text()[-2000:]
            time.sleep(0.05)
        winner.send_signal(signal.SIGTERM)
        winner.wait(timeout=SUBPROCESS_TIMEOUT)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert winner.returncode == 143, logs[1 - refused].read_text()[-2000:]
    (line,) = [line for line in loser.read_text().splitlines() if line.startswith("mf: error:")]
    assert line.startswith(f"mf: error: {root} is in use by another mf fit (process {winner.pid} on host ")
    assert "Traceback" not in loser.read_text()
    assert len(list((root / "tensorboard").glob("events.out.tfevents.*"))) == 1, "the refused run wrote no logs"
    assert torch.load(last, weights_only=True)["global_step"] >= 2
    assert not (root / ".mf-fit.lock").exists(), "the winner released the folder"


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_resume_after_a_sigterm_before_any_periodic_save_continues_last(tmp_path, accumulate):
    corpus = write_corpus(tmp_path / "corpus")
    args = tiny_run_args(tmp_path, corpus, max_steps=6, **LIGHT, **{"trainer.accumulate_grad_batches": accumulate})
    with pytest.raises(SystemExit) as exit_info:
        run("fit", args + signal_at(0, signal.SIGTERM))
    assert exit_info.value.code == 143
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    run("fit", args + ["--ckpt_path", "last"])
    assert sorted(path.name for path in (tmp_path / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp_sigterm_on_one_rank_stops_every_rank_at_one_step_and_resume_matches(tmp_path):
    """The agreement is strategy-agnostic: the same under FSDP (configs/fsdp_base.yaml's strategy), SIGTERM to rank 1."""
    corpus = write_corpus(tmp_path / "corpus")
    uninterrupted = run_fit(
        ddp_fit(tmp_path / "uninterrupted", corpus, strategy=FSDP_STRATEGY), timeout=SUBPROCESS_TIMEOUT
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-4000:]
    root = tmp_path / "preempted"
    stopped = run_fit(
        ddp_fit(root, corpus, *signal_at(3, signal.SIGTERM, 1), strategy=FSDP_STRATEGY), timeout=SUBPROCESS_TIMEOUT
    )
    assert stopped.returncode == 143, stopped.stderr[-4000:]
    assert "SIGTERM received by rank 1 of 2: every rank stops after step 4 and saves" in stopped.stdout + stopped.stderr
    assert read_checkpoint(root / "checkpoints" / "last.ckpt")["global_step"] == 4
    resumed = run_fit(ddp_fit(root, corpus, "--ckpt_path", "last", strategy=FSDP_STRATEGY), timeout=SUBPROCESS_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_weights(
        state_of(root / "checkpoints" / "last.ckpt"), state_of(tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt")
    )
