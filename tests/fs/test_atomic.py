"""Files replaced whole and the one temporary-name scheme: unique names, leftovers of killed writers removed."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mf_lightning.fs import atomic
from mf_lightning.fs.atomic import PARTIAL_NAME, atomic_file, partial_path, remove_abandoned, write_atomic


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def with_pid(path: Path, pid: int) -> Path:
    return path.with_name(path.name.replace(f"-{os.getpid()}-", f"-{pid}-"))


def test_temporary_names_are_hidden_unique_and_name_their_writer(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    first, second = partial_path(path), partial_path(path)
    assert first != second and first.parent == tmp_path
    assert first.name.startswith(".last.ckpt.") and first.name.endswith(".partial")
    match = PARTIAL_NAME.match(first.name)
    assert match and match["name"] == "last.ckpt" and int(match["pid"]) == os.getpid()


def test_leftovers_of_dead_writers_of_this_host_are_removed_and_others_kept(tmp_path: Path) -> None:
    """Files and folders alike; a live writer's and another host's (which cannot be asked) stay."""
    live_file, live_folder = partial_path(tmp_path / "last.ckpt"), partial_path(tmp_path / "cache")
    dead_file, dead_folder = with_pid(live_file, dead_pid()), with_pid(live_folder, dead_pid())
    elsewhere = tmp_path / f".last.ckpt.another_host-{dead_pid()}-0a1b2c3d.partial"
    for path in (live_file, dead_file, elsewhere):
        path.write_bytes(b"half")
    for path in (live_folder, dead_folder):
        path.mkdir()
        (path / "train.bin").write_bytes(b"half")
    assert sorted(remove_abandoned(tmp_path)) == sorted([dead_file, dead_folder])
    assert sorted(tmp_path.iterdir()) == sorted([live_file, live_folder, elsewhere])


def test_a_host_whose_name_ends_like_this_one_is_another_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dots in host names would make ``x.node1`` parse as host ``node1``: they are replaced in the name."""
    monkeypatch.setattr(atomic, "this_host", lambda: "login.node1")
    theirs = partial_path(tmp_path / "a")
    monkeypatch.setattr(atomic, "this_host", lambda: "node1")
    with_pid(theirs, dead_pid()).write_bytes(b"")
    assert remove_abandoned(tmp_path) == []


def test_atomic_file_replaces_the_target_only_when_the_block_completes(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "manifest.json"
    write_atomic(path, "old", "writing")
    with pytest.raises(KeyboardInterrupt), atomic_file(path, "writing") as file:
        file.write(b"half of the new")
        raise KeyboardInterrupt
    assert path.read_text() == "old"
    write_atomic(path, b"new", "writing")
    assert path.read_text() == "new" and os.listdir(path.parent) == ["manifest.json"]


def test_a_failed_write_names_the_target_not_the_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    with pytest.raises(OSError, match="No space left on device") as raised, atomic_file(path, "saving the model"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert raised.value.filename == str(path) and "(saving the model)" in raised.value.strerror
    assert os.listdir(tmp_path) == []


@pytest.fixture(params=[0o022, 0o027, 0o002])
def process_umask(request):
    """Runs the test under each umask, restoring the previous one."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_a_replaced_file_gets_the_mode_the_umask_gives_whatever_its_writer_chose(tmp_path, process_umask):
    target = tmp_path / "model.bin"
    with atomic_file(target, "writing") as file:
        os.fchmod(file.fileno(), 0o600)  # a writer that keeps its file private, as mkstemp does
        file.write(b"weights")
    assert target.stat().st_mode & 0o777 == 0o666 & ~process_umask
    assert atomic.umask() == process_umask


def test_a_file_replaces_a_folder_of_its_name_whole(tmp_path: Path) -> None:
    """A single-file checkpoint saved where a sharded one (a folder) was: resuming an FSDP run without FSDP."""
    target = tmp_path / "last.ckpt"
    target.mkdir()
    (target / "__0_0.distcp").write_bytes(b"shard")
    write_atomic(target, b"file", "saving a checkpoint")
    assert target.read_bytes() == b"file"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]
