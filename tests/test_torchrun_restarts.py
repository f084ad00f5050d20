"""torchrun ``--max-restarts`` end to end: a worker SIGKILLed mid-training (after ``last.ckpt`` exists) is restarted
with its group, the unchanged command (``--ckpt_path last``) resumes, and the final weights equal an uninterrupted
run's bit for bit; the killed attempt's run lock does not block the restarted rank 0.

Every launch uses the c10d rendezvous with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, the recipe of
docs/multi-gpu-and-slurm.md: without it (and with the static rendezvous) the restarted workers share the dead
attempt's store and may read its ranks' addresses (refused connections, or a hang across nodes).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_support import REPO, state_of, tiny_run_args, write_corpus

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS = 8
KILLED_AT = 5
"""The optimizer step at whose start a worker is killed: after the save at step 4, before the one at step 6."""
TIMEOUT = 300
SETTINGS = {
    "trainer.max_steps": STEPS,
    "validation.every_n_steps": 4,
    "model.overrides": "{max_seq_len: 64, code_bits: 4}",
    "bucket_usage.image_every_n_steps": 1000,
    "data.batch_size": 2,
    "trainer.accelerator": "cpu",
    "trainer.strategy": "ddp",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(port: int, nnodes: int, node_rank: int, nproc: int) -> list[str]:
    """torchrun on one "node" of ``nnodes``, ``nproc`` workers, restarting them once."""
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank)),
        *("--nproc-per-node", str(nproc), "--max-restarts", "1", "--monitor-interval", "0.5"),
        *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test"),
    ]


def fit(root: Path, corpus: Path, nnodes: int, nproc: int, kill: tuple[int, Path] | None) -> list[str]:
    """``mf fit ... --ckpt_path last`` (the command for every start) saving every 2 steps; ``kill`` is (rank, marker)
    for a ``KillOnce`` callback (tests/restart_support.py)."""
    settings = {**SETTINGS, "trainer.devices": nproc, "trainer.num_nodes": nnodes}
    args = ["-m", "mf_lightning", "fit", *tiny_run_args(root, corpus, **settings)]
    args += ["--checkpoint.every_n_train_steps", "2", "--ckpt_path", "last"]
    if kill is not None:
        init_args = {"step": KILLED_AT, "rank": kill[0], "marker": str(kill[1])}
        args += ["--trainer.callbacks+", json.dumps({"class_path": "restart_support.KillOnce", "init_args": init_args})]
    return args


def environment() -> dict[str, str]:
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), tests]), "OMP_NUM_THREADS": "1"}
    env.pop("MF_TRACEBACK", None)
    return {**env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def launch(root: Path, corpus: Path, nnodes: int, nproc: int, kill: tuple[int, Path] | None = None) -> list[str]:
    """Starts one torchrun per node (each its own working directory), waits for all; returns their outputs."""
    port = free_port()
    launchers = []
    for node_rank in range(nnodes):
        cwd = root.parent / f"{root.name}-node{node_rank}"
        cwd.mkdir()
        command = [*torchrun(port, nnodes, node_rank, nproc), *fit(root, corpus, nnodes, nproc, kill)]
        launchers.append(
            subprocess.Popen(
                command, cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = []
    try:
        for launcher in launchers:
            outputs.append(launcher.communicate(timeout=TIMEOUT)[0])
    finally:
        for launcher in launchers:
            launcher.kill()
    for launcher, output in zip(launchers, outputs):
        assert launcher.returncode == 0, output[-5000:]
    return outputs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus) -> dict[str, torch.Tensor]:
    """The final weights of the same launch (2 workers under torchrun) never interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted") / "run"
    launch(root, corpus, nnodes=1, nproc=2)
    return state_of(root / "checkpoints" / "last.ckpt")


def assert_resumed_and_matches(root: Path, marker: Path, outputs: list[str], expected: dict) -> None:
    output = "\n".join(outputs)
    assert marker.is_file(), "the worker was never killed"
    assert f"Restored all states from the checkpoint at {root / 'checkpoints' / 'last.ckpt'}" in output, output[-5000:]
    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS
    weights = last["state_dict"]
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[key], expected[key]) for key in expected)
    assert not (root / ".mf-fit.lock").exists(), "the restarted rank 0 left the run lock behind"


@pytest.mark.parametrize("killed", [0, 1], ids=["rank0-killed", "rank1-killed"])
def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_matches_an_uninterrupted_one(
    uninterrupted, corpus, tmp_path, killed
):
    """rank 0 killed: its run lock stays behind (SIGKILL runs no cleanup) and the restarted rank 0 takes it over,
    since its holder no longer runs on this host."""
    root, marker = tmp_path / "run", tmp_path / "killed"
    outputs = launch(root, corpus, nnodes=1, nproc=2, kill=(killed, marker))
    assert_resumed_and_matches(root, marker, outputs, uninterrupted)
    if killed == 0:
        assert f"removed the stale lock {root / '.mf-fit.lock'}" in outputs[0]


def test_a_killed_worker_on_the_second_of_two_nodes_restarts_both_and_matches(uninterrupted, corpus, tmp_path):
    """Two torchrun launchers, one worker each (``--nnodes 2 --node-rank {0,1}``); rank 1 (node 1) is killed."""
    root, marker = tmp_path / "run", tmp_path / "killed"
    outputs = launch(root, corpus, nnodes=2, nproc=1, kill=(1, marker))
    assert_resumed_and_matches(root, marker, outputs, uninterrupted)
