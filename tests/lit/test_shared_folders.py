"""The checks that every rank sees the folders rank 0 writes to, on one process (the collectives are the
strategy's; ``tests/test_cluster_faults.py`` runs them on two)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mf_lightning.lit import shared_folders
from mf_lightning.lit.distributed_checkpoint import missing_shards, shard_file
from mf_lightning.lit.shared_folders import FolderNotShared, check_all_shards, check_same_token_cache


def rank_zero(world_size: int = 2) -> SimpleNamespace:
    return SimpleNamespace(
        world_size=world_size, is_global_zero=True, broadcast=lambda value: value, barrier=lambda: None
    )


def gathered(monkeypatch, *values: object) -> None:
    """Every ``all_gather_object`` returns ``values`` (what rank 0 gets from the ranks)."""
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, _: out.__setitem__(slice(None), values))


def test_the_ranks_whose_shard_file_is_missing_are_found(tmp_path: Path) -> None:
    (tmp_path / shard_file(0)).write_bytes(b"")
    (tmp_path / shard_file(2)).write_bytes(b"")
    assert shard_file(1) == "__1_0.distcp"
    assert missing_shards(tmp_path, 4) == [1, 3]
    assert missing_shards(tmp_path, 1) == []


def test_a_save_missing_shards_is_refused_naming_them_and_what_to_do(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    with pytest.raises(FolderNotShared, match=r"shards of rank 1 are not in .*save_distributed_checkpoint: false"):
        check_all_shards(rank_zero(), [1], target)
    check_all_shards(rank_zero(), [], target)


def test_a_read_only_token_cache_is_compared_without_writing_to_it(tmp_path: Path, monkeypatch) -> None:
    """A prepared cache on a read-only mount (a shared data set) trains when the ranks agree, and differing caches
    are still one error; no token file is tried there (rank 0's failed write would leave the others waiting)."""
    cache = tmp_path / "cache"
    cache.mkdir()

    def read_only(path: Path, *args: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(shared_folders, "write_atomic", read_only)
    monkeypatch.setattr(os, "access", lambda path, mode: not (Path(path) == cache and mode == os.W_OK))
    gathered(monkeypatch, "same", "same")
    check_same_token_cache(rank_zero(), cache, "same")
    gathered(monkeypatch, "one", "other")
    with pytest.raises(FolderNotShared, match=r"^rank 1 prepared another token cache .* in data.cache_dir "):
        check_same_token_cache(rank_zero(), cache, "one")
