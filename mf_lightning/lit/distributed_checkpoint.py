"""Sharded checkpoints: a folder in which every FSDP rank writes its own shards (``torch.distributed.checkpoint``).

A checkpoint ``<name>.ckpt`` written by ``FSDP2Strategy`` (its default) is a folder holding

- ``__<rank>_0.distcp``: each rank's shards of the weights and of the optimizer's tensors (Adam's moments
  and step), written by that rank in parallel, so no host ever holds more than its own shards;
- ``.metadata``: where each tensor's pieces lie (``torch.distributed.checkpoint``'s index), which lets a
  load on any number of ranks read just the pieces of its own shards (resharding);
- ``__<rank>_0.distcp.digests.json``: the digest of every piece of that shard, hashed by the rank that
  wrote it and checked by each rank reading it (``mf_lightning.lit.checkpoint_digests``);
- ``meta.pt``: everything else, written by rank 0: loop and callback states, the learning-rate schedule,
  hyper-parameters, the model config and tokenizer ``mf`` stamps on every checkpoint, and the optimizer's
  non-tensor state (its parameter groups).

The layout is Lightning's ``ModelParallelStrategy`` distributed checkpoint (keys ``state_dict`` and
``optimizer_<i>``), with one difference: no Python object is pickled into the ``.distcp`` files (their
loader would unpickle it with ``weights_only=False``). Every file is opened through
``mf_lightning.lit.checkpoint_files``, so reading one runs no code from it: ``meta.pt`` with
``weights_only=True``, the index with an unpickler that admits only the classes of an index, the shards
through a reader that refuses stored Python objects.

Writing is atomic: the ranks write into a hidden staging folder beside the target, and rank 0 moves it
into place only after every rank has finished (``mf_lightning.fs.folders.replaced_folder``), swapping it
with an existing target in one ``renameat2(RENAME_EXCHANGE)`` where the file system supports it. A kill at any moment therefore leaves
the previous complete checkpoint, or the new complete one, under the target's name.

Reading: ``read_sharded_placeholder`` gives the ranks of a sharded resume the checkpoint without its
tensors (the weights as shape-only meta tensors, enough for ``check_checkpoint``), and
``load_sharded_model`` / ``load_sharded_optimizer`` then read each rank's shards in place;
``read_sharded_checkpoint`` assembles the whole checkpoint in one process, in the layout of a single
``.ckpt`` file, for ``mf export`` / ``eval`` / ``generate`` and a resume without sharding.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mf_lightning.fs.atomic import fsync_path
from mf_lightning.fs.errors import naming
from mf_lightning.lit.checkpoint_digests import DIGESTS_SUFFIX, SHARD_DIGESTS_KEY, DigestingWriter, has_piece_digests
from mf_lightning.lit.checkpoint_files import INDEX_NAME, UnreadableCheckpoint, load_file, load_shards, read_index
from mf_lightning.models.integrity import FAST_DIGEST

METADATA_NAME = "meta.pt"
"""The file of a sharded checkpoint that holds everything but the weights and optimizer tensors."""
WEIGHTS_KEY = "state_dict"
OPTIMIZER_REST_KEY = "mf_optimizer_rest"
"""``meta.pt`` key of each optimizer's non-tensor state: its ``param_groups`` and non-tensor per-parameter values."""
SHARDED_FOLDER_KEY = "mf_sharded_folder"
"""Key of a placeholder checkpoint (``read_sharded_placeholder``) naming the folder its tensors are still in."""
SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"
"""What ``torch.distributed.checkpoint`` warns on every single-process load, even one that asks for it."""


def optimizer_key(index: int) -> str:
    """The key under which optimizer ``index``'s tensors are stored (Lightning's name)."""
    return f"optimizer_{index}"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``save_sharded`` (or Lightning's distributed checkpoint)."""
    path = Path(path)
    return path.is_dir() and (path / INDEX_NAME).is_file() and (path / METADATA_NAME).is_file()


def shard_file(rank: int) -> str:
    """The file of a sharded checkpoint holding rank ``rank``'s shards (``torch.distributed.checkpoint``'s name)."""
    return f"__{rank}_0.distcp"


def missing_shards(folder: Path, world_size: int) -> list[int]:
    """The ranks of ``world_size`` whose shard file is not in ``folder``: none where the folder is shared."""
    return [rank for rank in range(world_size) if not (folder / shard_file(rank)).is_file()]


def split_optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """An FQN-keyed optimizer state dict (``get_optimizer_state_dict``) as its tensors and the rest.

    The tensors are ``{name: {"exp_avg": ..., ...}}``; the rest is ``{"param_groups": ..., "state":
    {name: {non-tensor values}}}``, the same on every rank.
    """
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, values in state["state"].items():
        tensors[name] = {key: value for key, value in values.items() if isinstance(value, torch.Tensor)}
        scalars[name] = {key: value for key, value in values.items() if not isinstance(value, torch.Tensor)}
    return tensors, {"param_groups": state["param_groups"], "state": scalars}


def merge_optimizer_state(tensors: Mapping[str, Mapping[str, Any]], rest: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``split_optimizer_state``."""
    names = set(tensors) | set(rest["state"])
    return {
        "state": {name: {**tensors.get(name, {}), **rest["state"].get(name, {})} for name in names},
        "param_groups": rest["param_groups"],
    }


def save_sharded(checkpoint: dict[str, Any], folder: Path, is_coordinator: bool, barrier: Callable[[], None]) -> None:
    """Writes ``checkpoint`` (weights and optimizer states as sharded, FQN-keyed state dicts) into ``folder``.

    Called on every rank at once: each writes its own shards; ``is_coordinator`` (rank 0) also writes
    ``meta.pt`` and the index, and fsyncs the folder once every rank is done (``barrier``).
    """
    import torch.distributed.checkpoint as dcp

    rest = dict(checkpoint)
    tensors: dict[str, Any] = {WEIGHTS_KEY: rest.pop(WEIGHTS_KEY)}
    rest[OPTIMIZER_REST_KEY] = []
    for index, state in enumerate(rest.pop("optimizer_states", [])):
        optimizer_tensors, optimizer_rest = split_optimizer_state(state)
        tensors[optimizer_key(index)] = {"state": optimizer_tensors}
        rest[OPTIMIZER_REST_KEY].append(optimizer_rest)
    rest[SHARD_DIGESTS_KEY] = FAST_DIGEST
    folder.mkdir(parents=True, exist_ok=True)
    with naming(folder, "saving a sharded checkpoint"):
        dcp.save(tensors, storage_writer=DigestingWriter(folder, sync_files=True))
        if is_coordinator:
            with (folder / METADATA_NAME).open("wb") as file:
                torch.save(rest, file)
                file.flush()
                os.fsync(file.fileno())
        barrier()
        if is_coordinator:
            fsync_path(folder)


def read_metadata(folder: Path, weights_only: bool = True) -> dict[str, Any]:
    """``meta.pt`` of a sharded checkpoint; one clear error if it cannot be read.

    With ``weights_only`` (the default) nothing but tensors and plain data is unpickled, so reading
    cannot run code from the file; ``False`` is for trusted checkpoints holding other Python objects.
    """
    metadata = load_file(folder / METADATA_NAME, weights_only=weights_only)
    if not isinstance(metadata, dict):
        raise UnreadableCheckpoint(
            f"{folder / METADATA_NAME} is not the metadata of a sharded checkpoint; give a checkpoint written by mf fit"
        )
    if metadata.pop(SHARD_DIGESTS_KEY, None) is not None and not has_piece_digests(folder):
        raise UnreadableCheckpoint(
            f"checkpoint {folder} is damaged: the digests of its shards (*{DIGESTS_SUFFIX}) are missing; restore "
            f"them or use another checkpoint from {folder.parent}"
        )
    return metadata


def tensor_index(folder: Path) -> dict[str, Any]:
    """``torch.distributed.checkpoint``'s index of ``folder`` (read without running code, ``read_index``):
    flattened key -> storage metadata."""
    return read_index(folder).state_dict_metadata


def stored_tensors(folder: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Empty tensors on ``device``, shaped and typed as stored, for every (flattened) key of ``folder``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {
        key: torch.empty(meta.size, dtype=meta.properties.dtype, device=device)
        for key, meta in tensor_index(folder).items()
        if isinstance(meta, TensorStorageMetadata)
    }


def read_sharded_placeholder(folder: Path, weights_only: bool = True) -> dict[str, Any]:
    """The checkpoint in ``folder`` with its tensors left on disk, for a sharded resume.

    The weights are meta tensors of the stored shapes and dtypes (what ``check_checkpoint`` compares
    before anything is copied); ``optimizer_states`` holds each optimizer's non-tensor part; the
    folder is recorded under ``SHARDED_FOLDER_KEY`` for ``load_sharded_model`` / ``load_sharded_optimizer``.
    """
    checkpoint = read_metadata(folder, weights_only)
    prefix = WEIGHTS_KEY + "."
    checkpoint[WEIGHTS_KEY] = {
        key[len(prefix) :]: value for key, value in stored_tensors(folder, "meta").items() if key.startswith(prefix)
    }
    checkpoint["optimizer_states"] = checkpoint.pop(OPTIMIZER_REST_KEY, [])
    checkpoint[SHARDED_FOLDER_KEY] = str(folder)
    return checkpoint


def load_sharded_model(folder: Path, model: nn.Module, strict: bool = True) -> None:
    """Reads this rank's shards of the weights in ``folder`` into the (FSDP-sharded) ``model``, in place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    state = {WEIGHTS_KEY: get_model_state_dict(model)}
    load_shards(state, folder)
    set_model_state_dict(model, state[WEIGHTS_KEY], options=StateDictOptions(strict=strict))


def load_sharded_optimizer(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, index: int, rest: Mapping[str, Any]
) -> None:
    """Reads this rank's shards of optimizer ``index``'s tensors in ``folder`` into ``optimizer``, with
    ``rest`` (its non-tensor state, from ``meta.pt``).

    Parameters are matched by name; the saved parameter groups must have the sizes of ``optimizer``'s.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    saved = [len(group["params"]) for group in rest["param_groups"]]
    current = [len(group["params"]) for group in optimizer.param_groups]
    if saved != current:
        raise ValueError(
            f"the checkpoint's optimizer has parameter groups of sizes {saved}, this one {current}; "
            "resume with the optimizer the checkpoint was trained with"
        )
    tensors, _ = split_optimizer_state(get_optimizer_state_dict(model, optimizer))
    load_shards({optimizer_key(index): {"state": tensors}}, folder)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=merge_optimizer_state(tensors, rest))


def read_sharded_checkpoint(folder: Path, weights_only: bool = True) -> dict[str, Any]:
    """The whole checkpoint in ``folder``, assembled in this process, laid out like a single ``.ckpt`` file:
    full weights under ``state_dict`` and each optimizer's state numbered group by group, as
    ``Optimizer.state_dict`` numbers it. Needs host memory for all of it (weights and optimizer state).
    ``weights_only`` applies to ``meta.pt`` (see ``read_metadata``).
    """
    checkpoint = read_metadata(folder, weights_only)
    tensors = stored_tensors(folder)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        load_shards(tensors, folder, no_dist=True)
    prefix = WEIGHTS_KEY + "."
    checkpoint[WEIGHTS_KEY] = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
    checkpoint["optimizer_states"] = [
        numbered_optimizer_state(tensors, optimizer_key(index) + ".state.", rest)
        for index, rest in enumerate(checkpoint.pop(OPTIMIZER_REST_KEY, []))
    ]
    return checkpoint


def numbered_optimizer_state(
    tensors: Mapping[str, torch.Tensor], prefix: str, rest: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``Optimizer.state_dict()`` of one saved optimizer: parameters numbered in group order.

    ``tensors`` are flattened keys ``<prefix><parameter name>.<state name>``; parameter names hold dots,
    state names (``exp_avg``, ``step`` ...) do not.
    """
    by_name: dict[str, dict[str, Any]] = {name: dict(values) for name, values in rest["state"].items()}
    for key, value in tensors.items():
        if key.startswith(prefix):
            name, state_name = key[len(prefix) :].rsplit(".", 1)
            by_name.setdefault(name, {})[state_name] = value
    numbers: dict[str, int] = {}
    groups = []
    for group in rest["param_groups"]:
        params = [numbers.setdefault(name, len(numbers)) for name in group["params"]]
        groups.append({**group, "params": params})
    return {
        "state": {numbers[name]: values for name, values in by_name.items() if values and name in numbers},
        "param_groups": groups,
    }
