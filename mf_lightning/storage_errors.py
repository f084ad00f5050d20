"""File-system failures a user must fix (read-only, full disk, quota, no permission) named by their path.

The ``mf`` CLI reports an ``OSError`` whose errno is in ``ENVIRONMENT_ERRNOS`` as one line; any other
``OSError`` is a bug and keeps its traceback. A failed ``write`` into an open file carries no file
name, so writers wrap their work in ``naming(path, action)`` to say which file or folder it was.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

ENVIRONMENT_ERRNOS = frozenset(
    {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR}
)
"""Errors of the machine or of the paths given, not of the program."""


@contextmanager
def naming(path: str | os.PathLike, action: str) -> Iterator[None]:
    """Re-raises an ``OSError`` of the block that names no file as the same error naming ``path`` and ``action``."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, f"{error.strerror} ({action})", os.fspath(path)) from error


def describe(error: OSError) -> str:
    """``path: reason`` when the error names a path, else the error's own text."""
    if error.filename is None:
        return str(error)
    return f"{error.filename}: {error.strerror}"
