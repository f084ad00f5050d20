"""URL paths, which the local file-system guarantees do not apply to."""

from __future__ import annotations

from pathlib import Path

import pytest

from mf_lightning.fs.remote import is_remote


@pytest.mark.parametrize("path", ["s3://bucket/run", "gs://b/checkpoints/last.ckpt", "hdfs://host:9000/x"])
def test_urls_are_remote(path: str) -> None:
    assert is_remote(path)


@pytest.mark.parametrize("path", ["runs/quick", "/tmp/a:b", Path("checkpoints")])
def test_local_paths_are_not(path: str | Path) -> None:
    assert not is_remote(path)
