"""The checks that every rank sees the folders rank 0 writes to, on one process (the collectives are the
strategy's; ``tests/test_cluster_faults.py`` runs them on two)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from mf_lightning.lit.distributed_checkpoint import missing_shards, shard_file
from mf_lightning.lit.shared_folders import FolderNotShared, check_all_shards


def rank_zero(world_size: int = 2) -> SimpleNamespace:
    return SimpleNamespace(world_size=world_size, is_global_zero=True, broadcast=lambda value: value)


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
