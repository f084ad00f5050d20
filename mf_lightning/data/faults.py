"""What a failed preparation tells its user: which side failed, what to do, and whether running again resumes.

A preparation reads the corpus and writes the token cache. A failure to write (a full disk, a quota, a
read-only file system, no permission) is an ``OSError`` naming the cache file it could not write and what
to do about it, never the input file being read at the time: writers wrap their writes in
``writing(path)``, which turns any ``OSError`` of them into a ``CacheWriteError`` (a ``OSError`` naming
``path``), so a worker process and the process that reports its failure can tell it from an error of
reading the corpus. ``unwritable`` makes the error ``mf`` prints in one line.

Whether running again resumes decides the last words of a message (``resume_hint``): after a write that
failed or a worker that was killed, the finished parts are kept and the same preparation goes on from
them; after an error in the corpus (bad JSON, a vanished or edited file) it cannot, since any change to
a file changes the corpus's identity and with it the cache it is tokenized into, so no hint is given.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOM = "free space there or set data.cache_dir to a disk with room"
WRITABLE = "set data.cache_dir to a folder you may write to"
REMEDIES = {
    errno.ENOSPC: ROOM,
    errno.EDQUOT: "free space within your quota there or set data.cache_dir to a disk with room",
    errno.EFBIG: "raise the file size limit (ulimit -f) or set data.cache_dir to a file system that allows larger files",
    errno.EROFS: f"the file system is read-only: {WRITABLE}",
    errno.EACCES: f"allow writing there or {WRITABLE}",
    errno.EPERM: f"allow writing there or {WRITABLE}",
    errno.ENOTDIR: "a part of that path is a file, not a folder: set data.cache_dir to a folder",
}
"""What to do about a failed write, by its errno; any other errno gets ``OTHER_REMEDY``."""
OTHER_REMEDY = "check the disk of data.cache_dir or set data.cache_dir to another one"


class PreparationFailed(ValueError):
    """A part could not be tokenized (bad input, a vanished file, a killed worker).

    A ``ValueError`` so that ``mf`` reports it in one line: what to fix is the input or the machine."""


class CacheWriteError(OSError):
    """Writing a file of the token cache failed; ``filename`` is that file (see ``writing``)."""


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Raises any ``OSError`` of the block as a ``CacheWriteError`` naming ``path`` (or the file it names itself).

    Only writes belong in the block: an error of reading the corpus inside it would be reported as one of
    the cache."""
    try:
        yield
    except CacheWriteError:
        raise
    except OSError as error:
        named = error.filename if error.filename is not None else os.fspath(path)
        cause = error.__cause__
        reason = cause if isinstance(cause, OSError) and cause.errno == error.errno else error  # before fs naming
        raise CacheWriteError(error.errno, reason.strerror or str(reason), named) from error


def unwritable(code: int | None, reason: str, path: str, after: str | None = None) -> OSError:
    """The error reported for a cache file ``path`` that could not be written (errno ``code``, ``reason``): the file,
    why, what to do, and ``after`` (what was kept, whether running again resumes)."""
    remedy = REMEDIES.get(code, OTHER_REMEDY) if code is not None else OTHER_REMEDY
    then = f"; then {after}" if after else ""
    return OSError(code, f"{reason} (writing the token cache: {remedy}{then})", path)


def resume_hint(unfinished: int, folder: Path) -> str:
    """What was kept of an interrupted tokenization and how to go on from it."""
    return (
        f"run the same preparation again to resume: {unfinished} part(s) are unfinished, "
        f"the finished ones are kept in {folder}"
    )
