"""``mf fit`` with Lightning's DDP on 2 CPU processes (gloo): ranks stay identical and match one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_support import REPO, scalars, tiny_run_args, write_corpus

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS = 6
LR = 3e-3
"""The quickstart config's peak learning rate, which ``tiny_run_args`` keeps."""
GRADIENT_RTOL = 1e-5
VAL_LOSS_RTOL = 1e-4
WEIGHT_TOLERANCE = 0.05
"""Of the largest distance Adam can move a weight in ``STEPS`` steps (``LR * STEPS``). A gradient ``g`` at least
eps changed by rounding noise ``d`` (~1e-10 here) changes Adam's step by about ``d / (|g| + eps)`` of ``LR``: 1% at
worst (measured: 0.1% of ``LR * STEPS`` at most). Adam's step does not depend on the gradient's scale, so the first-step gradients, not the
weights, are what catch a wrong reduction."""
MAX_LEFT_OUT = 0.05
"""The weights left out for a gradient below eps (measured: 0.3%, bias entries of keys and rarely used table
rows) must stay a small part of the model, or the comparison says nothing."""


def fit(root: Path, corpus: Path, devices: int, batch_size: int) -> subprocess.CompletedProcess:
    """``python -m mf_lightning fit`` on ``devices`` CPU processes, each rank saving its final weights."""
    args = tiny_run_args(
        root,
        corpus,
        max_steps=STEPS,
        **{
            "data.batch_size": batch_size,
            "data.val_windows": 8,
            "trainer.accelerator": "cpu",
            "trainer.devices": devices,
            "trainer.strategy": "ddp" if devices > 1 else "auto",
        },
    )
    probe = ["--trainer.callbacks+=ddp_probe.SaveRankWeights", "--trainer.callbacks.folder", str(root / "weights")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "mf_lightning", "fit", *args, *probe],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ddp")
    corpus = write_corpus(base / "corpus")
    fit(base / "one", corpus, devices=1, batch_size=4)
    fit(base / "two", corpus, devices=2, batch_size=2)
    return {"one": base / "one", "two": base / "two"}


def test_ranks_end_with_identical_weights(runs):
    rank0 = torch.load(runs["two"] / "weights" / "rank0.pt", weights_only=True)
    rank1 = torch.load(runs["two"] / "weights" / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def load(run: Path, name: str) -> dict:
    return torch.load(run / "weights" / f"{name}.pt", weights_only=True)


def test_first_step_gradients_of_two_processes_are_those_of_one(runs):
    """Same global batch: DDP's averaged gradient is the one process's gradient up to summation order, which
    moves a tensor's gradient by ~1e-7 of its norm; other data or a wrong reduction moves it by O(1)."""
    one, two = load(runs["one"], "gradients0")["first"], load(runs["two"], "gradients0")["first"]
    assert one.keys() == two.keys() and len(one) > 0
    for key in one:
        assert one[key].norm() > 0, key
        assert (two[key] - one[key]).norm() <= GRADIENT_RTOL * one[key].norm(), key


def test_two_processes_validate_like_one(runs):
    val_one, val_two = (
        scalars(runs["one"] / "tensorboard")["loss/val"],
        scalars(runs["two"] / "tensorboard")["loss/val"],
    )
    assert [s for s, _ in val_one] == [s for s, _ in val_two]
    for (_, a), (_, b) in zip(val_one, val_two):
        assert b == pytest.approx(a, rel=VAL_LOSS_RTOL)


def test_two_processes_with_half_the_batch_end_with_the_weights_of_one(runs):
    """After ``STEPS`` Adam steps every weight has moved by up to ~``LR`` per step; rounding noise changes a step
    by a fraction of it, except where the gradient is noise below Adam's eps (left out: Adam makes a step of its
    sign). So weights agree within ``WEIGHT_TOLERANCE`` of ``LR * STEPS`` everywhere else."""
    one, two = load(runs["one"], "rank0"), load(runs["two"], "rank0")
    noise_one, noise_two = load(runs["one"], "gradients0")["below_eps"], load(runs["two"], "gradients0")["below_eps"]
    tolerance = WEIGHT_TOLERANCE * LR * STEPS
    assert noise_one.keys() == noise_two.keys() == {key for key in one if key.endswith(("weight", "bias", "tables"))}
    left_out = compared = 0
    for key in noise_one:
        noise = noise_one[key] | noise_two[key]
        far = (two[key] - one[key]).abs() > tolerance
        assert not (far & ~noise).any(), f"{key}: {int((far & ~noise).sum())} weights differ by more than {tolerance:g}"
        left_out, compared = left_out + int(noise.sum()), compared + noise.numel()
    assert left_out < MAX_LEFT_OUT * compared, f"{left_out} of {compared} weights had gradients below eps"


def test_diagnostics_are_logged_once_from_rank_zero(runs):
    logged = scalars(runs["two"] / "tensorboard")
    assert [step for step, _ in logged["memory_usage/used_fraction"]] == [2, 4, 6]
    assert "memory_grad_summary/table_row_coverage" in logged
