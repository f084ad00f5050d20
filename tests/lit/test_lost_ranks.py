"""lost_rank_error: a collective that fails because another rank died becomes one error naming that rank."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from types import SimpleNamespace

import torch

from mf_lightning.lit import lost_ranks
from mf_lightning.lit.lost_ranks import RankLostError, lost_rank_error
from mf_lightning.lit.stop_signals import StoppedBySignal

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


def test_a_rank_that_does_not_answer_the_roll_call_in_the_jobs_store_is_named(monkeypatch):
    """Ranks on other nodes: rank 2 answered the roll call, rank 1 did not."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    store.set(f"{lost_ranks.ROLL_CALL_KEY}/0/2", "here")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setattr(lost_ranks, "EXIT_GRACE_SECONDS", 0.5)
    error = lost_rank_error(trainer(world_size=3), GLOO_RESET)
    assert str(error) == "rank 0 of 3 stopped: rank 1 did not answer within 0.5 s (killed, frozen or cut off)"


def test_without_a_store_to_call_the_roll_in_the_failed_connection_is_named(monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setattr(lost_ranks, "EXIT_GRACE_SECONDS", 0.5)
    error = lost_rank_error(trainer(), GLOO_RESET)
    assert str(error) == f"rank 0 of 2 stopped: the connection to another rank failed ({GLOO_RESET})"


def test_a_stop_signal_during_the_roll_call_ends_it_with_the_ranks_silent_so_far(monkeypatch):
    """torchrun stops the survivors of a dead worker at once: the line still names the silent rank."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)

    def stopped(seconds: float) -> None:
        raise StoppedBySignal(signal.SIGTERM)

    monkeypatch.setattr(lost_ranks.time, "sleep", stopped)
    error = lost_rank_error(trainer(), GLOO_RESET)
    assert str(error) == (
        "rank 0 of 2 stopped: rank 1 did not answer before the launcher stopped this rank (killed, frozen or cut off)"
    )
