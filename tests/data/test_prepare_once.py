"""Two processes of one job (two "nodes" of one rank each, sharing the cache folder) start ``mf fit`` at the
same moment: exactly one trains the BPE and one builds the token cache; the other waits and checks them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import REPO, tiny_run_args, write_corpus

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_train_the_tokenizer_and_build_the_cache_once(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", documents=40)
    args = tiny_run_args(
        tmp_path / "run",
        corpus,
        max_steps=2,
        **{
            "data.tokenizer": "bpe:300",
            "data.bpe_sample_bytes": 2000,
            "data.prepare_workers": 2,
            "data.cache_dir": tmp_path / "cache",
            "trainer.accelerator": "cpu",
            "trainer.devices": 1,
            "trainer.num_nodes": 2,
            "trainer.strategy": "ddp",
        },
    )
    port = str(free_port())
    processes = []
    for node in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": "2",
            "NODE_RANK": str(node),
            "LOCAL_RANK": "0",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "mf_lightning", "fit", *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    logs = []
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-4000:]
        logs.append(stderr)
    both = "".join(logs)
    assert both.count("training a byte-level BPE") == 1
    assert both.count("tokenizing the corpus into") == 1
