"""File-system failures a user must fix (read-only, full disk, quota, no permission) named by their path.

The ``mf`` CLI reports an ``OSError`` whose errno is in ``ENVIRONMENT_ERRNOS`` as one line; any other
``OSError`` is a bug and keeps its traceback. A failed ``write`` into an open file carries no file
name, and one into a temporary file or staging folder names a hidden path the user never asked
for, so writers wrap their work in ``naming(path, action, hidden)`` to say which file or folder it was.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENVIRONMENT_ERRNOS = frozenset(
    {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR}
)
"""Errors of the machine or of the paths given, not of the program."""


@contextmanager
def naming(path: str | os.PathLike, action: str, hidden: str | os.PathLike | None = None) -> Iterator[None]:
    """Re-raises an ``OSError`` of the block as the same error naming ``path`` and ``action`` when it names no
    file, or names ``hidden`` (the temporary file or staging folder ``path`` is written as) or a file in it."""
    try:
        yield
    except OSError as error:
        if error.errno is None:
            raise
        named = public_name(error.filename, Path(path), hidden)
        if named is None:
            raise
        raise OSError(error.errno, f"{error.strerror} ({action})", os.fspath(named)) from error


def public_name(filename: object, path: Path, hidden: str | os.PathLike | None) -> Path | None:
    """The path a user knows for ``filename``: ``path`` for no name, ``path/x`` for ``hidden/x``; None to keep it."""
    if filename is None:
        return path
    if hidden is None or not isinstance(filename, (str, os.PathLike)):
        return None
    try:
        inside = Path(filename).relative_to(hidden)
    except ValueError:
        return None
    return path / inside


def describe(error: OSError) -> str:
    """``path: reason`` when the error names a path, else the error's own text."""
    if error.filename is None:
        return str(error)
    return f"{error.filename}: {error.strerror}"
