"""lost_rank_error: a collective that fails because another rank died becomes one error naming that rank."""

from __future__ import annotations

import signal
import subprocess
import sys
from types import SimpleNamespace

from mf_lightning.lit import lost_ranks
from mf_lightning.lit.lost_ranks import RankLostError, lost_rank_error

GLOO_RESET = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:5044: Connection reset by peer.")


def trainer(world_size: int = 2, local_rank: int = 0, children: list | None = None) -> SimpleNamespace:
    launcher = SimpleNamespace(procs=children or [])
    return SimpleNamespace(
        world_size=world_size,
        global_rank=local_rank,
        local_rank=local_rank,
        node_rank=0,
        num_devices=world_size,
        strategy=SimpleNamespace(launcher=launcher),
    )


def test_rank_zero_names_the_child_rank_that_was_killed():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child.send_signal(signal.SIGKILL)
    error = lost_rank_error(trainer(children=[child]), GLOO_RESET)
    assert isinstance(error, RankLostError)
    assert str(error) == f"rank 0 of 2 stopped: rank 1 (process {child.pid}) was killed by SIGKILL"


def test_another_rank_names_rank_zero_when_the_process_that_started_it_is_gone(monkeypatch):
    monkeypatch.setattr(lost_ranks, "PARENT_AT_START", 4242)
    error = lost_rank_error(trainer(local_rank=1), GLOO_RESET)
    assert str(error) == "rank 1 of 2 stopped: rank 0 (process 4242, which started this one) is gone"


def test_without_a_dead_process_in_sight_the_failed_connection_is_named():
    error = lost_rank_error(trainer(), GLOO_RESET)
    assert str(error) == f"rank 0 of 2 stopped: the connection to another rank failed ({GLOO_RESET})"


def test_other_errors_and_single_process_runs_are_left_alone():
    crashed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    crashed.wait()
    assert lost_rank_error(trainer(children=[crashed]), RuntimeError("CUDA out of memory")) is None
    assert lost_rank_error(trainer(world_size=1), GLOO_RESET) is None
    assert lost_rank_error(None, GLOO_RESET) is None
