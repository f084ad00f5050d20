"""RunFolderLock: one mf fit per folder, claimed atomically; stale locks of dead processes are taken over."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from mf_lightning.lit.run_lock import LOCK_NAME, RunFolderInUse, RunFolderLock


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_claim_writes_host_and_pid_and_is_released(tmp_path):
    with RunFolderLock(tmp_path / "run") as lock:
        assert lock.path == tmp_path / "run" / LOCK_NAME
        assert lock.path.read_text() == f"{socket.gethostname()} {os.getpid()}\n"
        assert os.listdir(tmp_path / "run") == [LOCK_NAME], "no staged file is left behind"
    assert os.listdir(tmp_path / "run") == []


def test_a_folder_held_by_a_running_process_is_refused(tmp_path):
    with RunFolderLock(tmp_path), pytest.raises(RunFolderInUse) as error:
        RunFolderLock(tmp_path)
    message = str(error.value)
    assert f"{tmp_path} is in use by another mf fit (process {os.getpid()} on host {socket.gethostname()})" in message
    assert f"delete {tmp_path / LOCK_NAME}" in message


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(f"{socket.gethostname()} {dead_pid()}\n")
    with RunFolderLock(tmp_path) as lock:
        assert lock.path.read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    assert sorted(os.listdir(tmp_path)) == []


def test_a_lock_of_another_host_is_respected(tmp_path):
    (tmp_path / LOCK_NAME).write_text(f"other-host {dead_pid()}\n")
    with pytest.raises(RunFolderInUse, match="on host other-host"):
        RunFolderLock(tmp_path)
    assert (tmp_path / LOCK_NAME).read_text().startswith("other-host ")


def test_release_leaves_a_lock_it_does_not_hold(tmp_path):
    lock = RunFolderLock(tmp_path)
    lock.path.write_text("other-host 1\n")
    lock.release()
    assert lock.path.exists()


def test_of_many_claimers_of_one_stale_lock_exactly_one_wins(tmp_path):
    (tmp_path / LOCK_NAME).write_text(f"{socket.gethostname()} {dead_pid()}\n")
    outcomes, start = [], threading.Barrier(8)

    def claim() -> None:
        start.wait()
        try:
            RunFolderLock(tmp_path)
        except RunFolderInUse:
            outcomes.append("refused")
        else:
            outcomes.append("claimed")

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["claimed"] + ["refused"] * 7


def test_a_takeover_guard_left_by_a_killed_claimer_expires(tmp_path):
    (tmp_path / LOCK_NAME).write_text(f"{socket.gethostname()} {dead_pid()}\n")
    guard = tmp_path / f"{LOCK_NAME}.takeover"
    guard.write_text(f"{socket.gethostname()} {dead_pid()}\n")
    os.utime(guard, (0, 0))
    with RunFolderLock(tmp_path) as lock:
        assert lock.path.read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    assert os.listdir(tmp_path) == []
