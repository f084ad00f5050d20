"""FileLock: one holder at a time, its holder format, heartbeat, staleness on this host and across hosts, odd lock
files, and release when the holder is ended by a signal."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mf_lightning.fs import lock as lock_module
from mf_lightning.fs.lock import FileLock, LockFileUnreadable, LockHeld


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def holder_line(host: str, pid: int, token: str = "0123abcd") -> str:
    return json.dumps({"host": host, "pid": pid, "token": token, "what": "a test"}) + "\n"


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heartbeats and staleness in fractions of a second."""
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(lock_module, "STALE_SECONDS", 1.0)
    monkeypatch.setattr(lock_module, "POLL_SECONDS", 0.02)


def test_the_holder_is_one_json_line_and_released_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run" / ".mf-fit.lock"
    with FileLock(path, "the run") as lock:
        assert lock.held
        holder = json.loads(path.read_text())
        assert path.read_text().count("\n") == 1
        assert (holder["host"], holder["pid"], holder["what"]) == (socket.gethostname(), os.getpid(), "the run")
        assert len(holder["token"]) == 16 and holder["heartbeat_seconds"] == lock_module.HEARTBEAT_SECONDS
        assert os.listdir(path.parent) == [path.name], "no staged file is left behind"
    assert os.listdir(path.parent) == []


def test_a_live_holder_of_this_host_is_refused_at_once_when_not_waiting(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    with FileLock(path, "the thing"):
        started = time.monotonic()
        with pytest.raises(LockHeld) as raised:
            FileLock(path, "the thing").acquire(wait=0)
        assert time.monotonic() - started < 1.0
    message = str(raised.value)
    assert f"the thing is in use by process {os.getpid()} on host {socket.gethostname()} (lock {path})" in message
    assert f"delete {path}" in message and raised.value.holder.pid == os.getpid()


def test_a_waiter_enters_only_after_the_holder_leaves(tmp_path: Path, fast: None) -> None:
    path = tmp_path / ".thing.lock"
    events: list[str] = []
    entered = threading.Event()

    def hold() -> None:
        with FileLock(path, "the thing"):
            events.append("holder in")
            entered.set()
            time.sleep(0.5)
            events.append("holder out")

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait()
    with FileLock(path, "the thing"):
        events.append("waiter in")
    holder.join()
    assert events == ["holder in", "holder out", "waiter in"]
    assert not path.exists()


def test_waiting_gives_up_after_wait_seconds(tmp_path: Path, fast: None) -> None:
    path = tmp_path / ".lock"
    with FileLock(path, "the thing"):
        started = time.monotonic()
        with pytest.raises(LockHeld):
            FileLock(path, "the thing").acquire(wait=0.3)
        assert 0.3 <= time.monotonic() - started < 2.0


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / ".lock"
    path.write_text(holder_line(socket.gethostname(), dead_pid()))
    with caplog.at_level(logging.WARNING, logger="mf_lightning.fs.lock"), FileLock(path, "the thing").acquire(wait=0):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert any("removed the stale lock" in message for message in caplog.messages)
    assert os.listdir(tmp_path) == []


def beat(path: Path, seconds: float, period: float = 0.05) -> threading.Thread:
    """The other host's holder touching its lock for ``seconds``, then stopping (it crashed)."""

    def touch() -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            os.utime(path)
            time.sleep(period)

    thread = threading.Thread(target=touch)
    thread.start()
    return thread


def test_a_beating_holder_of_another_host_is_refused_once_its_heartbeat_is_seen(tmp_path: Path, fast: None) -> None:
    path = tmp_path / ".lock"
    path.write_text(holder_line("another-host", 1))
    heartbeat = beat(path, 2.0)
    started = time.monotonic()
    with pytest.raises(LockHeld, match="in use by process 1 on host another-host"):
        FileLock(path, "the thing").acquire(wait=0)
    assert time.monotonic() - started < lock_module.STALE_SECONDS, "refused as soon as it beat, not after the wait"
    heartbeat.join()
    assert path.exists()


def test_a_holder_of_another_host_whose_heartbeat_stopped_is_taken_over_after_the_stale_wait(
    tmp_path: Path, fast: None
) -> None:
    path = tmp_path / ".lock"
    path.write_text(holder_line("another-host", 1))
    started = time.monotonic()
    with FileLock(path, "the thing").acquire(wait=0):
        waited = time.monotonic() - started
        assert json.loads(path.read_text())["host"] == socket.gethostname()
    assert lock_module.STALE_SECONDS <= waited < lock_module.STALE_SECONDS + 2


def test_a_waiter_waits_while_the_other_host_beats_and_takes_over_when_it_stops(tmp_path: Path, fast: None) -> None:
    path = tmp_path / ".lock"
    path.write_text(holder_line("another-host", 1))
    heartbeat = beat(path, 2.0)
    with FileLock(path, "the thing"):
        assert not heartbeat.is_alive(), "not taken while the heartbeat went on"
    heartbeat.join()


def test_release_leaves_a_lock_it_no_longer_holds(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / ".lock", "the thing").acquire(wait=0)
    lock.path.write_text(holder_line("other-host", 1))
    lock.release()
    assert json.loads(lock.path.read_text())["host"] == "other-host"


def test_the_same_process_holding_twice_is_refused_by_token_not_by_pid(tmp_path: Path) -> None:
    """Two acquisitions of one process are two holders: the second is refused, and releasing it leaves the first."""
    first = FileLock(tmp_path / ".lock", "the thing").acquire(wait=0)
    second = FileLock(tmp_path / ".lock", "the thing")
    with pytest.raises(LockHeld):
        second.acquire(wait=0)
    second.release()
    assert first.still_mine()
    first.release()
    assert not first.path.exists()


def test_of_many_claimers_of_one_stale_lock_exactly_one_wins(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    path.write_text(holder_line(socket.gethostname(), dead_pid()))
    outcomes, start = [], threading.Barrier(8)

    def claim() -> None:
        start.wait()
        try:
            lock = FileLock(path, "the thing").acquire(wait=0)
        except LockHeld:
            outcomes.append("refused")
            start.wait()
        else:
            outcomes.append("claimed")
            start.wait()  # the others have tried
            lock.release()

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["claimed"] + ["refused"] * 7


def test_a_takeover_guard_left_by_a_killed_claimer_expires(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    path.write_text(holder_line(socket.gethostname(), dead_pid()))
    guard = tmp_path / ".lock.takeover"
    guard.write_text(holder_line(socket.gethostname(), dead_pid()))
    os.utime(guard, (0, 0))
    with FileLock(path, "the thing").acquire(wait=0):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert os.listdir(tmp_path) == []


def test_the_heartbeat_touches_the_lock_while_it_is_held(tmp_path: Path, fast: None) -> None:
    with FileLock(tmp_path / ".lock", "the thing") as lock:
        os.utime(lock.path, (0, 0))
        time.sleep(0.5)
        assert lock.path.stat().st_mtime > 0
        assert lock.heartbeat is not None and lock.heartbeat.is_alive()
    assert lock.heartbeat is None


def test_the_heartbeat_stops_when_the_lock_was_taken_over(tmp_path: Path, fast: None) -> None:
    lock = FileLock(tmp_path / ".lock", "the thing").acquire(wait=0)
    lock.path.write_text(holder_line("other-host", 1))
    os.utime(lock.path, (0, 0))
    time.sleep(0.5)
    assert lock.path.stat().st_mtime == 0, "another holder's lock is not kept alive"
    lock.release()


def odd_lock(path: Path, kind: str) -> None:
    if kind == "folder":
        path.mkdir()
        (path / "x").write_text("")
    elif kind == "not-utf8":
        path.write_bytes(b"\xff\xfe\x00garbage\x80")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("myhost 1234\n")
    elif kind == "json-without-holder":
        path.write_text('{"host": "h", "pid": "1"}')
    elif kind == "huge-pid":
        path.write_text(holder_line("h", 10**30))
    elif kind == "dangling-link":
        path.symlink_to(path.parent / "nothing")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "unreadable":
        path.write_text(holder_line("h", 1))
        path.chmod(0)


ODD_KINDS = ["folder", "not-utf8", "empty", "text", "json-without-holder", "huge-pid", "dangling-link", "fifo"]


@pytest.mark.parametrize("kind", [*ODD_KINDS, "unreadable"])
@pytest.mark.parametrize("wait", [0, None])
def test_a_lock_file_that_is_no_lock_is_one_error_naming_it_and_is_left_alone(
    tmp_path: Path, kind: str, wait: float | None
) -> None:
    path = tmp_path / ".mf-fit.lock"
    odd_lock(path, kind)
    if kind == "unreadable" and os.access(path, os.R_OK):
        pytest.skip("this user reads files without permission (root)")
    with pytest.raises(LockFileUnreadable) as raised:
        FileLock(path, "the run folder x").acquire(wait=wait)
    message = str(raised.value)
    assert message.startswith(f"the lock file {path} cannot be read as a lock (")
    assert f"it guards the run folder x); if no mf process is using it, delete it (rm -r {path})" in message
    assert "\n" not in message and os.path.lexists(path)


def test_a_takeover_guard_that_is_no_guard_is_one_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    path.write_text(holder_line(socket.gethostname(), dead_pid()))
    (tmp_path / ".lock.takeover").mkdir()
    with pytest.raises(
        LockFileUnreadable, match=r"the lock file .*\.lock\.takeover cannot be read as a lock \(it is a folder"
    ):
        FileLock(path, "the thing").acquire(wait=0)


def test_a_file_in_the_way_of_the_lock_folder_is_one_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("a file")
    with pytest.raises(NotADirectoryError) as raised:
        FileLock(tmp_path / "run" / ".lock", "the thing").acquire(wait=0)
    assert raised.value.filename == str(tmp_path / "run")


HOLDER_UNTIL_SIGNALLED = textwrap.dedent(
    """
    import signal, sys, time
    from mf_lightning.fs.lock import FileLock
    if sys.argv[2] == "own-handler":
        signal.signal(signal.SIGTERM, lambda signum, frame: print("own handler", flush=True))
    with FileLock(sys.argv[1], "the thing"):
        print("holding", flush=True)
        time.sleep(30 if sys.argv[2] == "default" else 2)
    print("released", flush=True)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_holder_ended_by_a_signal_releases_its_lock(tmp_path: Path, signum: int) -> None:
    path = tmp_path / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER_UNTIL_SIGNALLED, str(path), "default"], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "holding\n"
    holder.send_signal(signum)
    assert holder.wait(timeout=20) == 128 + signum
    assert not path.exists()


def test_a_signal_handler_of_the_holder_is_left_in_place(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER_UNTIL_SIGNALLED, str(path), "own-handler"], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "holding\n"
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(timeout=20) == 0
    assert holder.stdout.read().split("\n")[:2] == ["own handler", "released"]
    assert not path.exists()


def test_the_default_handlers_are_back_once_no_lock_is_held(tmp_path: Path) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed by the main thread only")
    with FileLock(tmp_path / ".a", "a"), FileLock(tmp_path / ".b", "b"):
        assert signal.getsignal(signal.SIGTERM) == lock_module.RELEASE_ON_SIGNALS.handle
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
