"""Multi-rank faults on localhost, one process per "node" (each started by hand with the variables torchrun
sets, as a launcher on each node would) or Lightning's own launcher: a run folder that is not shared, a
frozen rank, a launch of another size than ``num_nodes``, and a change of strategy across a resume."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_support import REPO, write_corpus

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

CONFIG = REPO / "configs" / "fsdp_base.yaml"
TINY = {
    "model.preset": "debug",
    "trainer.accelerator": "cpu",
    "trainer.precision": "32-true",
    "data.source": "demo",
    "data.tokenizer": "byte",
    "data.seq_len": 32,
    "data.num_workers": 0,
    "data.val_windows": 4,
    "data.batch_size": 2,
    "trainer.accumulate_grad_batches": 1,
    "trainer.enable_progress_bar": False,
    "trainer.devices": 1,
}
COLLECTIVE_TIMEOUT = 15
"""Seconds; the frozen-rank test waits this long, plus the time to name the rank (long enough that a loaded CI
machine does not time out while the ranks start)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def mf_fit(cache: Path, settings: dict, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "mf_lightning", "fit", "--config", str(CONFIG)]
    for key, value in {**TINY, "data.cache_dir": cache, **settings}.items():
        args += [f"--{key}", str(value)]
    return [*args, *extra]


def environment(**variables: object) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MF_TRACEBACK", None)
    return {**env, **{key: str(value) for key, value in variables.items()}}


def node(rank: int, world_size: int, port: int, cwd: Path, args: list[str]) -> subprocess.Popen:
    """A rank started as torchrun starts one process per node (``LOCAL_RANK`` 0 on each)."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=world_size, NODE_RANK=rank, LOCAL_RANK=0)
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mf: error:")]


def test_a_run_folder_that_is_not_shared_stops_every_rank_before_the_first_step(tmp_path):
    """Node-local disks: each "node" has its own working directory, the run folder is relative."""
    args = mf_fit(
        tmp_path / "cache", {"trainer.num_nodes": 2, "trainer.max_steps": 2, "trainer.default_root_dir": "run"}
    )
    port = free_port()
    nodes = [node(rank, 2, port, tmp_path / f"node{rank}", args) for rank in (0, 1)]
    results = [process.communicate(timeout=120) for process in nodes]
    for rank, (process, (_, stderr)) in enumerate(zip(nodes, results)):
        assert process.returncode == 2, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        lines = error_lines(stderr)
        assert len(lines) == 1, stderr[-3000:]
        assert f"trainer.default_root_dir {tmp_path / 'node0' / 'run'}" in lines[0]
        assert "rank 1 cannot see the file rank 0 wrote there" in lines[0]
        assert "shared" in lines[0]
        assert not list((tmp_path / f"node{rank}" / "run").glob("checkpoints/*.ckpt"))
    assert not list((tmp_path / "node0" / "run").glob(".mf-shared-*"))


def test_a_shared_run_folder_trains_on_two_nodes(tmp_path):
    """The same launch with one absolute run folder passes the check and saves every rank's shards."""
    root = tmp_path / "run"
    args = mf_fit(
        tmp_path / "cache", {"trainer.num_nodes": 2, "trainer.max_steps": 2, "trainer.default_root_dir": root}
    )
    port = free_port()
    nodes = [node(rank, 2, port, tmp_path / f"node{rank}", args) for rank in (0, 1)]
    for process in nodes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr[-3000:]
    assert (root / "checkpoints" / "last.ckpt" / "__1_0.distcp").is_file()
    assert not list(root.glob(".mf-shared-*"))


def two_nodes_with_own_corpora(tmp_path: Path, cache: Path, documents: tuple[int, int]) -> list[tuple[int, str]]:
    """Two "nodes" (own working directories), each with its own copy of the corpus at the relative path ``corpus``
    (``documents`` documents on each), sharing one absolute run folder; returns each one's (status, stderr)."""
    for rank, count in enumerate(documents):
        write_corpus(tmp_path / f"node{rank}" / "corpus", documents=count)
    settings = {"trainer.num_nodes": 2, "trainer.max_steps": 2, "trainer.default_root_dir": tmp_path / "run"}
    args = mf_fit(cache, {**settings, "data.source": "corpus"})
    port = free_port()
    nodes = [node(rank, 2, port, tmp_path / f"node{rank}", args) for rank in (0, 1)]
    results = []
    for process in nodes:
        _, stderr = process.communicate(timeout=120)
        results.append((process.returncode, stderr))
    return results


def test_a_cache_folder_that_is_not_shared_and_holds_other_data_stops_every_rank_before_the_first_step(tmp_path):
    """A relative data.cache_dir on each "node", whose copies of the corpus differ: the ranks would train on
    different data, silently."""
    results = two_nodes_with_own_corpora(tmp_path, Path("cache"), (24, 25))
    for status, stderr in results:
        assert status == 2, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        (line,) = error_lines(stderr)
        assert f"data.cache_dir {tmp_path / 'node0' / 'cache'} (as rank 0 on host" in line, line
        assert "is not shared (rank 1 cannot see the file rank 0 wrote there)" in line, line
        assert "rank 1 prepared another token cache" in line and "absolute path" in line, line
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))
    assert not list((tmp_path / "node0" / "cache").glob(".mf-shared-*"))


def test_a_cache_folder_that_is_not_shared_and_holds_the_same_data_trains_on_two_nodes(tmp_path):
    """Node-local caches of one corpus: each node tokenizes its own copy once, and they agree."""
    results = two_nodes_with_own_corpora(tmp_path, Path("cache"), (24, 24))
    for status, stderr in results:
        assert status == 0, stderr[-3000:]
        assert stderr.count("tokenizing the corpus into cache") == 1, stderr[-3000:]
    assert "each node prepared its own copy of the token cache" in results[0][1]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_a_shared_cache_folder_with_other_text_on_each_node_stops_every_rank(tmp_path):
    """One absolute data.cache_dir, but data.source (relative) is another file on each node."""
    results = two_nodes_with_own_corpora(tmp_path, tmp_path / "cache", (24, 25))
    for status, stderr in results:
        assert status == 2, stderr[-3000:]
        (line,) = error_lines(stderr)
        assert (
            f"rank 1 prepared another token cache (tokenizer or tokens) than rank 0 in the shared data.cache_dir "
            f"{tmp_path / 'cache'}" in line
        ), line
        assert "data.source" in line, line


def test_a_launch_of_another_size_than_num_nodes_is_one_line(tmp_path):
    """torchrun started 2 processes; the config says 1 node of 1 device."""
    port = free_port()
    args = mf_fit(tmp_path / "cache", {"trainer.max_steps": 1, "trainer.default_root_dir": tmp_path / "run"})
    variables = {"TORCHELASTIC_RUN_ID": "test", "GROUP_RANK": 0, "RANK": 0, "LOCAL_WORLD_SIZE": 1}
    env = environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=2, LOCAL_RANK=0, **variables)
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert "`devices=1` and `num_nodes=1`" in line and "world size (2)" in line


def children(pid: int) -> list[int]:
    return [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]


def endless_fit(tmp_path: Path, root: Path, settings: dict[str, object]) -> list[str]:
    """``mf fit`` into ``root`` that trains until stopped (no validation), its collectives timing out after
    ``COLLECTIVE_TIMEOUT`` seconds, with ``settings`` (how the ranks are laid out)."""
    endless = {"trainer.max_steps": 100_000, "validation.every_n_steps": 100_000, "trainer.default_root_dir": root}
    timeout = f"0:00:{COLLECTIVE_TIMEOUT:02d}"
    return mf_fit(tmp_path / "cache", {**settings, **endless}, "--trainer.strategy.init_args.timeout", timeout)


def test_a_frozen_rank_ends_the_run_with_one_line_naming_it(tmp_path):
    """SIGSTOP to rank 1 (started by Lightning's launcher): rank 0's next collective times out, and it names
    rank 1 within the timeout and a margin instead of waiting silently or printing gloo's traceback."""
    root = tmp_path / "run"
    args = endless_fit(tmp_path, root, {"trainer.devices": 2})
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr_file:
        process = subprocess.Popen(args, env=environment(), stderr=stderr_file, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not list((root / "tensorboard").glob("events.*")) or not children(process.pid):
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    time.sleep(2)  # a few steps in
    (rank1,) = children(process.pid)
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        process.wait(timeout=COLLECTIVE_TIMEOUT + 30)
    finally:
        os.kill(rank1, signal.SIGKILL)
    waited = time.monotonic() - stopped
    stderr = log.read_text()
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert line.startswith(f"mf: error: rank 0 of 2 stopped: rank 1 (process {rank1}) is stopped"), line
    assert "--ckpt_path last" in line
    assert COLLECTIVE_TIMEOUT - 1 < waited < COLLECTIVE_TIMEOUT + 20, waited


@pytest.mark.parametrize("signum", [signal.SIGSTOP, signal.SIGKILL], ids=["frozen", "killed"])
def test_a_lost_rank_on_another_node_is_named_by_the_survivors_roll_call(tmp_path, signum):
    """Rank 1 is a "node" of its own (no process of rank 0's that could be asked about it): frozen, rank 0's next
    collective times out; killed, it fails at once. Either way rank 0 names rank 1 from the roll call in the
    job's store, not gloo's message."""
    root = tmp_path / "run"
    args = endless_fit(tmp_path, root, {"trainer.num_nodes": 2})
    port = free_port()
    rank0, rank1 = (node(rank, 2, port, tmp_path / f"node{rank}", args) for rank in (0, 1))
    deadline = time.monotonic() + 90
    while not list((root / "tensorboard").glob("events.*")):
        assert rank0.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    time.sleep(2)  # a few steps in
    os.kill(rank1.pid, signum)
    lost = time.monotonic()
    try:
        _, stderr = rank0.communicate(timeout=COLLECTIVE_TIMEOUT + 30)
    finally:
        rank1.kill()
        rank1.communicate()
    waited = time.monotonic() - lost
    assert rank0.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert line.startswith("mf: error: rank 0 of 2 stopped: rank 1 did not answer within 5 s"), line
    assert "--ckpt_path last" in line
    if signum == signal.SIGSTOP:
        assert COLLECTIVE_TIMEOUT - 1 < waited < COLLECTIVE_TIMEOUT + 25, waited


def test_a_sharded_checkpoint_resumed_without_fsdp_and_back_keeps_saving(tmp_path):
    """FSDP on 2 ranks, then ``--trainer.strategy auto`` on one process into the same folder (its saves
    replace the sharded folders by files), then FSDP again (files replaced by folders)."""
    root = tmp_path / "run"
    last = root / "checkpoints" / "last.ckpt"
    base = {"trainer.default_root_dir": root, "validation.every_n_steps": 2}
    runs = [
        ({"trainer.devices": 2, "trainer.max_steps": 2}, ()),
        ({"trainer.strategy": "auto", "data.batch_size": 4, "trainer.max_steps": 4}, ("--ckpt_path", "last")),
        ({"trainer.devices": 2, "trainer.max_steps": 6}, ("--ckpt_path", "last")),
    ]
    for settings, extra in runs:
        result = subprocess.run(
            mf_fit(tmp_path / "cache", {**base, **settings}, *extra),
            env=environment(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert last.is_dir() == (settings.get("trainer.strategy") != "auto")
    assert (last / "__1_0.distcp").is_file()
    names = sorted(path.name for path in last.parent.iterdir())  # the best is whichever step validated lowest
    assert len(names) == 2 and names[0].startswith("best-step=") and names[1] == "last.ckpt", names
