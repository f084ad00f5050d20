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


def fit(root: Path, corpus: Path, devices: int, batch_size: int) -> subprocess.CompletedProcess:
    """``python -m mf_lightning fit`` on ``devices`` CPU processes, each rank saving its final weights."""
    args = tiny_run_args(
        root, corpus, max_steps=6,
        **{"data.batch_size": batch_size, "data.val_windows": 8, "trainer.accelerator": "cpu",
           "trainer.devices": devices, "trainer.strategy": "ddp" if devices > 1 else "auto"},
    )
    probe = ["--trainer.callbacks+=ddp_probe.SaveRankWeights", "--trainer.callbacks.folder", str(root / "weights")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mf_lightning", "fit", *args, *probe],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
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


def test_two_processes_with_half_the_batch_match_one_process(runs):
    """Same global batch, so the same weights up to float summation order, which Adam's normalised steps
    amplify on near-zero gradients to ~1e-5; other data would move weights by ~lr = 3e-3 per step."""
    one = torch.load(runs["one"] / "weights" / "rank0.pt", weights_only=True)
    two = torch.load(runs["two"] / "weights" / "rank0.pt", weights_only=True)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-4, msg=lambda m: f"{key}: {m}")
    val_one, val_two = scalars(runs["one"] / "tensorboard")["val/loss"], scalars(runs["two"] / "tensorboard")["val/loss"]
    assert [s for s, _ in val_one] == [s for s, _ in val_two]
    for (_, a), (_, b) in zip(val_one, val_two):
        assert b == pytest.approx(a, rel=1e-3)


def test_diagnostics_are_logged_once_from_rank_zero(runs):
    logged = scalars(runs["two"] / "tensorboard")
    assert [step for step, _ in logged["bucket_usage/used_fraction"]] == [2, 4, 6]
    assert "grad_summary/table_row_coverage" in logged
