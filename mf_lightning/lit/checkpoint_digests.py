"""Digests of a checkpoint's tensors, recorded at save and checked at load, so damaged bytes are never used.

A bit flipped on disk or in a copy of a checkpoint loads silently as other weights (or optimizer
moments): torch's zip reader does not check what it reads. So checkpoints carry a digest
(``FAST_DIGEST``, :mod:`mf_lightning.models.integrity`) of every tensor:

- a single ``.ckpt`` file: of every tensor anywhere in it (weights, optimizer state, callback state),
  by its path in the checkpoint (``state_dict/blocks.0.norm.weight``, ``optimizer_states/0/state/3/exp_avg``),
  stored under ``DIGESTS_KEY`` (plain strings: ``weights_only`` reads it) and checked after loading;
- a sharded folder: of every piece each rank wrote into its own ``.distcp`` file, hashed by that rank from
  what it wrote (no gather), stored beside it as ``<shard>.digests.json``, and checked by each rank for the
  pieces it reads, before they are unpickled. ``meta.pt`` records that the folder has digests
  (``SHARD_DIGESTS_KEY``), so deleted digest files are damage too.

A checkpoint written before digests were recorded loads unchecked. What a digest promises (accidental
damage is found; a deliberate edit is not) is in ``docs/checkpoint-integrity.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from mf_lightning.models.integrity import FAST_DIGEST, bytes_digest, tensor_digest

DIGESTS_KEY = "mf_tensor_digests"
"""Key of a single-file checkpoint's digests."""
SHARD_DIGESTS_KEY = "mf_shard_digests"
"""Key of ``meta.pt`` naming the hash its folder's shard digests use."""
DIGESTS_SUFFIX = ".digests.json"
"""What a shard's digest file adds to the shard's name."""
LISTED = 5


def tensors_in(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in the nested dicts, lists and tuples of ``value``, with its ``/``-joined path."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if path or key != DIGESTS_KEY:
                yield from tensors_in(item, f"{path}/{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from tensors_in(item, f"{path}/{index}" if path else str(index))


def with_digests(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` with the digest of each of its tensors under ``DIGESTS_KEY`` (a single-file checkpoint)."""
    digests = {path: tensor_digest(tensor) for path, tensor in tensors_in(checkpoint)}
    return {**checkpoint, DIGESTS_KEY: {"hash": FAST_DIGEST, "tensors": digests}}


def damaged_tensors(checkpoint: Mapping[str, Any]) -> list[str]:
    """The paths of the tensors of a loaded single-file checkpoint whose digest differs from the one recorded
    (missing or added tensors included); none for a checkpoint that records no digests."""
    recorded = checkpoint.get(DIGESTS_KEY)
    if recorded is None:
        return []
    if not isinstance(recorded, Mapping) or recorded.get("hash") != FAST_DIGEST:
        return [f"(the digests, recorded as {str(recorded)[:60]!r})"]
    expected = recorded.get("tensors", {})
    found = {path: tensor_digest(tensor) for path, tensor in tensors_in(checkpoint)}
    return sorted(path for path in set(found) | set(expected) if found.get(path) != expected.get(path))


def listed(names: list[str]) -> str:
    """Up to ``LISTED`` of ``names``, comma-separated."""
    return ", ".join(names[:LISTED]) + (", ..." if len(names) > LISTED else "")


def piece_digest(descriptor: int, offset: int, length: int) -> str:
    """The digest of ``length`` bytes at ``offset`` of the open file ``descriptor``."""
    data = os.pread(descriptor, length, offset)
    if len(data) != length:
        return f"(only {len(data)} of {length} bytes)"
    return bytes_digest(data)


def write_piece_digests(folder: Path, pieces: Iterable[tuple[str, str, int, int]]) -> None:
    """Hashes the pieces ``(tensor key, shard file name, offset, length)`` this rank wrote into its shards of
    ``folder`` (a staging folder, moved into place whole) and writes each shard's ``<shard>.digests.json``."""
    by_shard: dict[str, list[tuple[str, int, int]]] = {}
    for key, name, offset, length in pieces:
        by_shard.setdefault(name, []).append((key, offset, length))
    for name, entries in by_shard.items():
        descriptor = os.open(folder / name, os.O_RDONLY)
        try:
            digests = {
                f"{offset}+{length}": [key, piece_digest(descriptor, offset, length)] for key, offset, length in entries
            }
        finally:
            os.close(descriptor)
        with (folder / (name + DIGESTS_SUFFIX)).open("w") as file:
            json.dump({"hash": FAST_DIGEST, "pieces": digests}, file)
            file.flush()
            os.fsync(file.fileno())


def read_piece_digests(path: Path) -> dict[str, list[str]]:
    """The digests recorded for a shard (``<shard>.digests.json``): ``"<offset>+<length>"`` -> [key, digest];
    raises ``ValueError`` for a file that does not hold them."""
    recorded = json.loads(path.read_text(encoding="utf-8"))
    if (
        not isinstance(recorded, dict)
        or recorded.get("hash") != FAST_DIGEST
        or not isinstance(recorded.get("pieces"), dict)
    ):
        raise ValueError(f"it does not hold {FAST_DIGEST} digests")
    return recorded["pieces"]


def has_piece_digests(folder: Path) -> bool:
    """Whether any shard of ``folder`` has a digest file."""
    return any(folder.glob("*" + DIGESTS_SUFFIX))


class DigestingWriter(FileSystemWriter):
    """``FileSystemWriter`` that records the digest of every piece this rank writes (``write_piece_digests``)."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        future = super().write_data(plan, planner)
        pieces = [
            (
                result.index.fqn,
                result.storage_data.relative_path,
                result.storage_data.offset,
                result.storage_data.length,
            )
            for result in future.wait()
        ]
        write_piece_digests(Path(self.path), pieces)
        return future
