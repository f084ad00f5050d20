"""The job-wide build lock: one holder at a time, waiters proceed when it is released, stale locks are removed."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mf_lightning.data import job_lock
from mf_lightning.data.job_lock import exclusive


def test_a_waiter_enters_only_after_the_holder_leaves(tmp_path: Path) -> None:
    lock = tmp_path / ".thing.lock"
    events: list[str] = []
    entered = threading.Event()

    def hold() -> None:
        with exclusive(lock, "the thing"):
            events.append("holder in")
            entered.set()
            time.sleep(0.5)
            events.append("holder out")

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait()
    with exclusive(lock, "the thing"):
        events.append("waiter in")
    holder.join()
    assert events == ["holder in", "holder out", "waiter in"]
    assert not lock.exists()


def test_the_lock_of_a_dead_process_on_this_host_is_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".thing.lock"
    lock.write_text(f"process {int(dead.stdout)} on {socket.gethostname()}")
    with caplog.at_level(logging.WARNING, logger="mf_lightning.data.job_lock"), exclusive(lock, "the thing"):
        assert lock.read_text() == f"process {os.getpid()} on {socket.gethostname()}"
    assert any("removing the stale lock" in message for message in caplog.messages)


def test_a_live_holder_elsewhere_is_waited_for_until_its_heartbeat_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_lock, "STALE_SECONDS", 1.0)
    monkeypatch.setattr(job_lock, "POLL_SECONDS", 0.05)
    lock = tmp_path / ".thing.lock"
    lock.write_text("process 1 on another-host")
    beating = threading.Event()
    beating.set()

    def heartbeat() -> None:  # the other host's holder touching its lock, then stopping (it crashed)
        for _ in range(20):
            os.utime(lock, ns=(time.time_ns(), time.time_ns()))
            time.sleep(0.1)
        beating.clear()

    thread = threading.Thread(target=heartbeat)
    thread.start()
    with exclusive(lock, "the thing"):
        assert not beating.is_set()  # not taken while the heartbeat went on
    thread.join()
