"""Folders built out of sight and swapped in whole, so a reader never sees a half-built or half-replaced one.

``replaced_folder(target)`` hands out an empty staging folder beside ``target`` (named by
``atomic.partial_path``, so a killed builder's is removed by the next one on this host); when the block
ends without error every file in it is given the usual mode (``atomic.usual_mode``: what ``open`` gives under the
umask, whatever mode its writer chose) and fsynced, and it is installed as ``target`` by ``install``; an error
removes it and leaves ``target`` as it was. A crash at any moment leaves the previous complete folder or
the new complete one under ``target``'s name.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mf_lightning.fs.atomic import fsync_path, give_usual_mode, partial_path, remove, remove_abandoned
from mf_lightning.fs.errors import naming

RENAME_EXCHANGE = 2
AT_FDCWD = -100
ASIDE_SUFFIX = ".old"
"""Added to a staging folder's name for the replaced target on file systems that cannot swap two names; not
removed as abandoned, so a crash between the two renames leaves the old target recoverable under that name."""


@contextmanager
def replaced_folder(target: Path, action: str) -> Iterator[Path]:
    """A new empty folder to build ``target`` in, installed in its place when the block ends (see the module).

    ``OSError``s name ``target`` (and the file in it) with ``action``, not the hidden staging folder.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target.parent)
    stage = partial_path(target)
    try:
        with naming(target, action, stage):
            stage.mkdir()
            yield stage
            settle_tree(stage)
            install(stage, target)
    finally:
        if os.path.lexists(stage):
            remove(stage)


def settle_tree(folder: Path) -> None:
    """Gives every regular file under ``folder`` the usual mode, and makes them, every folder and ``folder``
    itself durable."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                give_usual_mode(path)
            fsync_path(path)
        fsync_path(Path(root))


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
