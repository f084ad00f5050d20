"""Folders built out of sight and swapped in whole, so a reader never sees a half-built or half-replaced one.

``replaced_folder(target)`` hands out an empty staging folder beside ``target`` (named by
``atomic.partial_path``, so a killed builder's is removed by the next one on this host); when the block
ends without error every file in it is given the usual mode (``atomic.usual_mode``: what ``open`` gives under the
umask, whatever mode its writer chose) and fsynced, and it is installed as ``target`` by ``install``; an error
removes it and leaves ``target`` as it was. A crash at any moment leaves the previous complete folder or
the new complete one under ``target``'s name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mf_lightning.fs.atomic import fsync_path, give_usual_mode, install, partial_path, remove, remove_abandoned
from mf_lightning.fs.errors import naming


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
