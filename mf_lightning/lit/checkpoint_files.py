"""Opening the files of a checkpoint: the one place they are read, so that none of them can run code.

A ``.ckpt`` file and a sharded folder's ``meta.pt`` are ``torch.load``-ed with ``weights_only=True``
(``load_file``), which unpickles nothing but tensors and plain data. A sharded folder's ``.metadata``
(``torch.distributed.checkpoint``'s index of where each tensor's pieces lie) is a plain pickle, which
torch's own reader unpickles with ``pickle.load``; here ``read_index`` unpickles it admitting only the
classes such an index is made of (``index_globals``), then checks its structure and refuses an entry
stored as a pickled Python object (torch would unpickle it with ``weights_only=False``; ``mf`` never
stores one). Its ``.distcp`` shards are read by ``ShardReader``, which serves that checked index to
``torch.distributed.checkpoint`` (which reads tensors with ``weights_only=True``); ``load_shards`` is
the one call of ``torch.distributed.checkpoint.load``.

Whatever goes wrong reading a file (missing, truncated, damaged, foreign, holding code) is one
``UnreadableCheckpoint`` naming the file (``unreadable``), also when another rank's read failed: every
rank of a sharded load raises the same one.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, filesystem, metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner

from mf_lightning.fs.errors import ENVIRONMENT_ERRNOS
from mf_lightning.lit.checkpoint_digests import (
    DIGESTS_SUFFIX,
    damaged_tensors,
    has_piece_digests,
    listed,
    piece_digest,
    read_piece_digests,
)

INDEX_NAME = ".metadata"
"""``torch.distributed.checkpoint``'s index of the tensors' pieces."""
TRUSTED_HINT = "trainer.plugins=mf_lightning.lit.checkpoints.AtomicCheckpointIO and weights_only: false"
UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that cannot be used, named with what is wrong with it.

    Every rank of a job that reads a checkpoint reads the same files (a shard another rank failed to read
    fails on every rank, see ``load_shards``), so every rank raises the same error and only the first
    process reports it (``mf_lightning.cli.main``).
    """


def load_file(
    path: Path,
    map_location: Callable | str | torch.device | None = "cpu",
    weights_only: bool = True,
    mmap: bool = False,
) -> Any:
    """``torch.load`` of one checkpoint file (a ``.ckpt``, or a sharded folder's ``meta.pt``), its tensors
    checked against the digests it records; its failures are one error naming the file: a refused Python
    object, damaged bytes, or tensors that differ from their digests."""
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except Exception as error:  # torch.load fails on damaged bytes in many ways (RuntimeError, EOFError, ...)
        raise unreadable(path, error) from error
    changed = damaged_tensors(loaded) if isinstance(loaded, dict) else []
    if changed:
        raise damaged(path, changed)
    return loaded


def unreadable(path: Path, error: BaseException) -> Exception:
    """The one error for a checkpoint file that cannot be read: what ``error`` says is wrong, naming ``path``.

    A file-system failure the user must fix (no permission, ...) stays an ``OSError`` naming the file;
    a Python object ``weights_only`` refused says it is refused and how to load a trusted file anyway.
    """
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
        return OSError(error.errno, error.strerror, str(path))
    unsafe = UNSUPPORTED_GLOBAL.search(str(error)) if isinstance(error, pickle.UnpicklingError) else None
    if unsafe is not None:
        return refused(
            path, unsafe.group(1), f"if you trust this Python object ({unsafe.group(1)}), load it with {TRUSTED_HINT}"
        )
    if isinstance(error, FileNotFoundError):
        reason = "it is missing"
    else:
        reason = str(error).strip().split("\n")[0].split(". ")[0] or type(error).__name__
    return UnreadableCheckpoint(
        f"checkpoint {path} cannot be read ({reason}): it is truncated, corrupt or not a checkpoint; "
        f"use another checkpoint from {checkpoint_folder(path)} or start over without --ckpt_path"
    )


def damaged(path: Path, tensors: list[str]) -> UnreadableCheckpoint:
    """The error for a checkpoint file whose ``tensors`` differ from the digests recorded when it was written."""
    return UnreadableCheckpoint(
        f"checkpoint {path} is damaged: the data of {len(tensors)} tensor(s) ({listed(tensors)}) does not match "
        f"the digest recorded when it was saved (a flipped bit or a changed byte on disk or in a copy); use another "
        f"checkpoint from {checkpoint_folder(path)} or start over without --ckpt_path"
    )


def refused(path: Path, what: str, remedy: str) -> UnreadableCheckpoint:
    """The error for a checkpoint file holding a Python object beyond tensors and plain data."""
    return UnreadableCheckpoint(
        f"checkpoint {path} holds a Python object beyond tensors and plain data ({what}); mf does not "
        f"unpickle such objects because that can run code; {remedy}"
    )


def checkpoint_folder(path: Path) -> Path:
    """The folder holding the checkpoint ``path`` belongs to (the run's checkpoint folder)."""
    return path.parent.parent if path.parent.suffix == ".ckpt" else path.parent


def index_globals() -> dict[tuple[str, str], Any]:
    """What an index may name, by (module, name): the classes of ``torch.distributed.checkpoint.metadata``
    and ``filesystem`` an index is built of (the fields of ``Metadata``, ``TensorStorageMetadata``,
    ``TensorProperties``, ``MetadataIndex`` and ``_StorageInfo``), ``torch.Size``, the dtypes, the layout
    lookup torch pickles layouts by, and the path type of ``StorageMeta.checkpoint_id``."""
    classes = (
        metadata.Metadata,
        metadata.StorageMeta,
        metadata.TensorStorageMetadata,
        metadata.BytesStorageMetadata,
        metadata.ChunkStorageMetadata,
        metadata.TensorProperties,
        metadata._MEM_FORMAT_ENCODING,
        metadata.MetadataIndex,
        filesystem._StorageInfo,
        torch.Size,
        pathlib.PurePosixPath,
        pathlib.PosixPath,
        pathlib.PureWindowsPath,
        pathlib.WindowsPath,
    )
    allowed: dict[tuple[str, str], Any] = {(cls.__module__, cls.__qualname__): cls for cls in classes}
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name in dir(torch):
        if isinstance(getattr(torch, name), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class IndexUnpickler(pickle.Unpickler):
    """An unpickler that builds nothing but what ``index_globals`` lists: no other class or function is
    looked up, so unpickling can call nothing else (``pickle``'s documented way of restricting globals)."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.allowed = index_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("an index holds no persistent references")


def read_index(folder: Path) -> Any:
    """The checked ``torch.distributed.checkpoint`` index (``Metadata``) of the sharded checkpoint ``folder``."""
    path = folder / INDEX_NAME
    try:
        with path.open("rb") as file:
            index = IndexUnpickler(file).load()
    except pickle.UnpicklingError as error:
        unsafe = UNSUPPORTED_GLOBAL.search(str(error))
        if unsafe is None:
            raise unreadable(path, error) from error
        raise refused(path, unsafe.group(1), "an index holds nothing but where the tensors lie") from error
    except Exception as error:  # a damaged pickle fails in many ways (EOFError, ValueError, TypeError, ...)
        raise unreadable(path, error) from error
    problem = index_problem(index)
    if problem is not None:
        raise UnreadableCheckpoint(
            f"checkpoint {path} is not the index of a checkpoint written by mf fit ({problem}); use another "
            f"checkpoint from {folder.parent} or start over without --ckpt_path"
        )
    for key, entry in index.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            shard = next((info.relative_path for where, info in index.storage_data.items() if where.fqn == key), "")
            raise refused(
                folder / shard if shard else path,
                f"{key}, stored as bytes to unpickle",
                "mf stores tensors only: use a checkpoint written by mf fit",
            )
    return index


def index_problem(index: Any) -> str | None:
    """What is wrong with an unpickled index, or None: every field of the kind ``mf fit`` writes, every
    piece in a file of the folder itself, none transformed (``mf`` writes no storage transforms)."""
    if not isinstance(index, Metadata):
        return f"it holds a {type(index).__name__}, not a Metadata"
    if not isinstance(index.state_dict_metadata, dict) or not isinstance(index.storage_data, dict):
        return "it lists no tensors"
    for key, entry in index.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not (
            isinstance(key, str)
            and isinstance(entry, TensorStorageMetadata)
            and isinstance(entry.properties, TensorProperties)
            and isinstance(entry.properties.dtype, torch.dtype)
            and isinstance(entry.size, torch.Size)
            and isinstance(entry.chunks, list)
            and all(
                isinstance(chunk, ChunkStorageMetadata)
                and isinstance(chunk.offsets, torch.Size)
                and isinstance(chunk.sizes, torch.Size)
                for chunk in entry.chunks
            )
        ):
            return f"entry {key!r} is not a tensor's"
        if any(MetadataIndex(key, chunk.offsets) not in index.storage_data for chunk in entry.chunks):
            return f"a piece of {key!r} is not listed"
    for where, info in index.storage_data.items():
        if not (isinstance(where, MetadataIndex) and isinstance(info, _StorageInfo)):
            return "a piece is not a tensor's"
        name = info.relative_path
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            return f"piece {where.fqn!r} lies outside the folder ({name!r})"
        if not all(isinstance(value, int) and value >= 0 for value in (info.offset, info.length)):
            return f"piece {where.fqn!r} has no valid place in {name}"
        if info.transform_descriptors:
            return f"piece {where.fqn!r} is stored transformed ({', '.join(map(str, info.transform_descriptors))})"
    return None


class ShardReader(FileSystemReader):
    """``FileSystemReader`` of a folder whose index ``read_index`` has read and checked: that index is what
    ``read_metadata`` gives, the pieces it reads are checked against their digests before they are
    unpickled, and a failure to read a shard is one error naming it."""

    def __init__(self, folder: Path, index: Metadata) -> None:
        super().__init__(folder)
        self.folder, self.index = folder, index
        self.reading = folder / INDEX_NAME
        self.checked = has_piece_digests(folder)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self.index.storage_meta = self.index.storage_meta or StorageMeta()
        self.index.storage_meta.load_id = self.load_id
        return self.index

    def check_pieces(self, pieces: dict[tuple[str, int, int], str]) -> None:
        """Raises one error naming the shard and tensor of the first of ``pieces`` ((shard, offset, length)
        -> tensor key) whose bytes differ from the digest recorded when they were written, before any is
        unpickled."""
        for name in sorted({shard for shard, _, _ in pieces}):
            path, digests_path = self.folder / name, self.folder / (name + DIGESTS_SUFFIX)
            try:
                recorded = read_piece_digests(digests_path)
            except (OSError, ValueError) as error:  # missing, unreadable, not JSON
                raise unreadable(digests_path, error) from error
            try:
                descriptor = os.open(path, os.O_RDONLY)
            except OSError as error:
                raise unreadable(path, error) from error
            try:
                for (shard, offset, length), key in sorted(pieces.items()):
                    expected = recorded.get(f"{offset}+{length}", [key, None])[1]
                    if shard == name and piece_digest(descriptor, offset, length) != expected:
                        raise damaged(path, [key])
            finally:
                os.close(descriptor)

    def _slice_file(self, file: Any, sinfo: _StorageInfo) -> Any:
        self.reading = self.folder / sinfo.relative_path
        return super()._slice_file(file, sinfo)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self.checked:
            pieces = {}
            for item in plan.items:
                stored = self.storage_data[item.storage_index]
                pieces[(stored.relative_path, stored.offset, stored.length)] = item.storage_index.fqn
            self.check_pieces(pieces)
        try:
            return super().read_data(plan, planner)
        except Exception as error:  # a missing or damaged shard: OSError, EOFError, RuntimeError, pickle ...
            path = Path(error.filename) if isinstance(error, OSError) and error.filename else self.reading
            raise unreadable(path, error) from error


def load_shards(state: dict[str, Any], folder: Path, no_dist: bool = False) -> None:
    """``torch.distributed.checkpoint.load`` of ``state`` (tensors, filled in place) from ``folder``, through
    ``ShardReader``; a failure on any rank is the same one error on every rank: the first rank's named
    file, else the index (which says where every piece lies, e.g. not the tensors ``state`` asks for)."""
    reader = ShardReader(folder, read_index(folder))
    try:
        dcp.load(state, storage_reader=reader, no_dist=no_dist)
    except CheckpointException as error:
        failures = [error.failures[rank][0] for rank in sorted(error.failures)]
        named = [failure for failure in failures if isinstance(failure, UnreadableCheckpoint)]
        named += [failure for failure in failures if isinstance(failure, OSError) and failure.filename]
        raise (named[0] if named else unreadable(folder / INDEX_NAME, failures[0])) from error
