"""Cached folders built out of sight and swapped in whole, so a reader never sees a half-built one.

A builder writes into a hidden staging folder beside the target whose name records its host and
process id, then renames it over the target. An exception removes the staging folder at once; a
process killed outright (SIGKILL, power loss) cannot, so the next builder in the same folder removes
every staging folder whose process no longer runs on this host. Staging folders of other hosts
(a shared file system) are left alone: whether their builder still runs cannot be told from here.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

STAGING_MARK = ".staging-"
STAGING_NAME = re.compile(r"^\..+\.staging-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")


@contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A new empty folder beside ``target`` to build it in; removed when the block ends unless moved into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target.parent)
    prefix = f".{target.name}{STAGING_MARK}{socket.gethostname()}-{os.getpid()}-"
    staged = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def move_into_place(staged: Path, target: Path) -> None:
    """Replaces the folder ``target`` (if any) by ``staged``.

    Raises ``OSError`` when another builder moved its own copy into place in between; the caller then
    checks that copy.
    """
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staged, target)


def remove_abandoned(folder: Path) -> None:
    """Removes the staging folders in ``folder`` left by processes of this host that no longer run."""
    host = socket.gethostname()
    for path in folder.iterdir():
        match = STAGING_NAME.match(path.name)
        if match and match["host"] == host and not is_running(int(match["pid"])):
            log.info("removing %s, left by an interrupted build (process %s)", path, match["pid"])
            shutil.rmtree(path, ignore_errors=True)


def is_running(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
