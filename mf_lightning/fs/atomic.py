"""Files replaced whole: written under a temporary name beside the target, fsynced, then renamed over it.

Every temporary file and staging folder ``mf`` writes is named by ``partial_path``:
``.<name>.<host>-<pid>-<random>.partial`` beside its target. It is hidden, never matches what a reader
looks for (``*.ckpt``, a cache folder), is unique to its writer (two processes saving one target at once
never write into, or rename away, each other's file), and records who wrote it, so ``remove_abandoned``
can delete what a writer of this host killed outright (SIGKILL, power loss) left behind while leaving
alone what a live writer, or one on another host sharing the folder, is still writing.

``atomic_file`` writes a file that way: a reader, or a crash at any moment, finds the previous complete
file or the new complete one, never a part (``os.replace`` is atomic on POSIX file systems; a folder of the same
name, such as a sharded checkpoint of an earlier strategy, is swapped out by ``install``; the file and then its
folder are fsynced so the new name survives a power loss with its contents). Every file replaced so, and every
file of a folder replaced whole (``folders``), gets the mode a new file gets from ``open`` under the process's
umask (``usual_mode``): a writer that creates its file private (``safetensors`` writes 0600) does not leave
``model.safetensors`` unreadable beside 0644 files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from mf_lightning.fs.errors import naming
from mf_lightning.fs.processes import is_running, this_host

PARTIAL_SUFFIX = ".partial"
PARTIAL_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)-[0-9a-f]+\.partial$")
"""A name ``partial_path`` gives; the host has its dots replaced (``host_label``), so it parses back exactly."""
RENAME_EXCHANGE = 2
AT_FDCWD = -100
ASIDE_SUFFIX = ".old"
"""Added to a staging folder's name for the replaced target on file systems that cannot swap two names; not
removed as abandoned, so a crash between the two renames leaves the old target recoverable under that name."""


def host_label(host: str) -> str:
    """``host`` as it appears in temporary names: without dots, so the name's fields are unambiguous."""
    return host.replace(".", "_")


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (see the module): hidden, beside it, unique."""
    token = secrets.token_hex(4)
    return path.with_name(f".{path.name}.{host_label(this_host())}-{os.getpid()}-{token}{PARTIAL_SUFFIX}")


def abandoned(path: Path) -> bool:
    """Whether ``path`` is a temporary file or folder (``partial_path``) of a process of this host that no longer runs."""
    match = PARTIAL_NAME.match(path.name)
    return bool(match) and match["host"] == host_label(this_host()) and not is_running(int(match["pid"]))


def remove_abandoned(folder: Path) -> list[Path]:
    """Deletes the temporary files and folders in ``folder`` left by killed writers of this host; returns them."""
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = [path for path in entries if abandoned(path)]
    for path in removed:
        remove(path)
    return removed


def remove(path: Path) -> None:
    """Deletes a file, link or folder (a folder with everything in it); nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def umask() -> int:
    """The process's umask, read without changing it where Linux reports it (``os.umask`` sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(mode: int) -> int:
    """The permission bits of a new file under the umask: ``0o666 & ~umask``, or ``0o777 & ~umask`` when ``mode``
    makes it executable (a script stays one)."""
    return (0o777 if mode & 0o111 else 0o666) & ~umask()


def give_usual_mode(path: Path) -> None:
    """Sets the regular file ``path``'s permissions to ``usual_mode`` (see the module)."""
    os.chmod(path, usual_mode(path.stat().st_mode))


def fsync_path(path: Path) -> None:
    """Makes ``path`` durable (a folder: its entries, so a rename inside it survives a crash); a no-op where
    folders cannot be opened (e.g. Windows)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_file(path: Path, action: str) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new contents into; it replaces ``path`` when the block ends without error.

    An error (or interruption) in the block removes the temporary file and leaves ``path`` as it was;
    ``OSError``s name ``path`` and ``action``, not the temporary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_path(path)
    try:
        with naming(path, action, temporary):
            with temporary.open("wb") as file:
                yield file
                file.flush()
                os.fchmod(file.fileno(), usual_mode(os.fstat(file.fileno()).st_mode))
                os.fsync(file.fileno())
            if path.is_dir() and not path.is_symlink():  # e.g. a sharded checkpoint where a file now goes
                install(temporary, path)
            else:
                os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a cleanup that fails (a read-only disk) must not hide the error
            temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def install(stage: Path, target: Path) -> None:
    """Moves the complete ``stage`` (a folder or file) to ``target``, replacing what is there without a moment in
    which ``target`` is missing where the file system can swap two names atomically.

    Elsewhere (a file system without ``RENAME_EXCHANGE``, e.g. some network file systems) the old target is
    first renamed aside (``ASIDE_SUFFIX``), so a kill between the two renames leaves it under a hidden name.
    """
    if not os.path.lexists(target):
        os.rename(stage, target)
    elif exchange(stage, target):
        remove(stage)
    else:
        aside = stage.with_name(stage.name + ASIDE_SUFFIX)
        os.rename(target, aside)
        os.rename(stage, target)
        remove(aside)
    fsync_path(target.parent)


def exchange(first: Path, second: Path) -> bool:
    """Swaps two paths atomically (Linux ``renameat2``); ``False`` where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def write_atomic(path: Path, data: bytes | str, action: str) -> None:
    """Replaces ``path`` by ``data`` (``str`` is written as UTF-8) with ``atomic_file``."""
    with atomic_file(path, action) as file:
        file.write(data.encode("utf-8") if isinstance(data, str) else data)
