"""Paths that name remote storage (``s3://bucket/run``, ``gs://``, ``hdfs://``...) rather than a local or mounted folder.

Lightning writes such paths through fsspec; the local file-system guarantees of this package (atomic
replacement, locks, clean-up of leftovers) cannot be given there, so callers skip them for remote paths.
"""

from __future__ import annotations

import os


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``<scheme>://...``) rather than a local or mounted path."""
    return "://" in os.fspath(path)
