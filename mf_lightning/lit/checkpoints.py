"""Checkpoint files that survive crashes and hostile input.

Writing: ``AtomicCheckpointIO`` (installed by ``mf`` as the trainer's checkpoint plugin) writes every
checkpoint to a temporary file in the target's folder, fsyncs it, renames it over the target with
``os.replace`` and fsyncs the folder, so a kill at any moment leaves either the previous complete
file or the new complete file, never a truncated one. (Lightning's own ``_atomic_save`` stages the
file in the system temporary folder and moves it, which is a plain copy when that folder is on
another file system, and never fsyncs.) ``AtomicModelCheckpoint`` does the same for
``save_last="link"``, whose symbolic link Lightning replaces by deleting the old one first.

Reading: checkpoints are loaded with ``torch.load(weights_only=True)``, which refuses to unpickle
anything but tensors and plain containers, so loading a checkpoint cannot run code from it. A missing,
truncated, corrupt or foreign file is one clear error naming it. ``check_checkpoint`` compares what
a checkpoint holds (model config, tokenizer, tensor shapes) with the model it is loaded into.
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint

from mf_lightning.data.staging import is_running
from mf_lightning.lit.distributed_checkpoint import is_sharded_checkpoint, read_sharded_checkpoint
from mf_lightning.models.pretrained import COMPILE_PREFIX, RUNTIME_FIELDS, state_problems
from mf_lightning.storage_errors import naming

MODEL_CONFIG_KEY = "mf_model_config"
TOKENIZER_KEY = "mf_tokenizer"
TOKENIZER_STATE_KEY = "mf_tokenizer_state"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic on local disks and whose loads never run pickled code.

    ``weights_only=False`` allows checkpoints holding arbitrary Python objects; only set it for files
    you trust, since unpickling them can execute code. Remote paths (``s3://`` ...) are saved by
    Lightning's own method.
    """

    def __init__(self, weights_only: bool = True) -> None:
        self.weights_only = weights_only

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
        else:
            atomic_save(checkpoint, Path(path))

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | str | torch.device | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return read_checkpoint(path, map_location, self.weights_only if weights_only is None else weights_only)


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``save_last="link"`` swaps the ``last.ckpt`` link atomically.

    Lightning deletes the old link and then creates the new one; a kill between the two would leave no
    ``last.ckpt`` and ``--ckpt_path last`` would silently start over. Here the new link is made under a
    temporary name and renamed over the old one. ``save_last=True`` writes a full file, made atomic by
    ``AtomicCheckpointIO``.
    """

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            temporary = partial_path(Path(linkpath))
            os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), temporary)
            os.replace(temporary, linkpath)
        trainer.strategy.barrier()


def partial_path(path: Path) -> Path:
    """Where ``path`` is staged while written: hidden, in the same folder, not named like a checkpoint.

    The name is unique to this writer (host, process id and a random part), so two processes saving
    the same target at once never write into, or rename away, each other's temporary file.
    """
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.partial")


def remove_stale_partials(path: Path) -> None:
    """Deletes temporary files or folders of ``path`` left by killed writers of this host (other hosts' may be live)."""
    prefix = f".{path.name}.{socket.gethostname()}-"
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        pid = stale.name[len(prefix):].split("-")[0] if stale.name.startswith(prefix) else ""
        if pid.isdigit() and not is_running(int(pid)):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)


def atomic_save(checkpoint: dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` through a fsynced temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    temporary = partial_path(path)
    try:
        with naming(path, "saving a checkpoint"), temporary.open("wb") as file:
            try:
                torch.save(checkpoint, file)
            except RuntimeError as error:  # torch's zip writer hides a failed write (full disk) behind its own error
                if isinstance(error.__context__, OSError):
                    raise error.__context__ from error
                raise
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Makes a rename inside ``directory`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_checkpoint(
    path: _PATH,
    map_location: Callable | str | torch.device | None = "cpu",
    weights_only: bool = True,
    mmap: bool = False,
) -> dict[str, Any]:
    """The checkpoint at ``path``; unreadable files raise one error naming the file and what to do.

    A sharded checkpoint folder (``FSDP2Strategy``) is assembled whole in this process
    (``mf_lightning.lit.distributed_checkpoint.read_sharded_checkpoint``).
    ``mmap`` maps the tensors from the file instead of reading them, so processes that each need a part
    of a large checkpoint (sharded resume) share the page cache instead of holding a copy each.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; give an existing .ckpt file or 'last'")
    if path.is_dir():
        if is_sharded_checkpoint(path):
            return read_sharded_checkpoint(path, weights_only)
        raise ValueError(
            f"checkpoint {path} is a folder, expected a .ckpt file or a sharded checkpoint folder (with .metadata "
            "and meta.pt) written by mf fit (a save_pretrained folder loads with load_pretrained)"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsafe is None:
            raise corrupt(path, error) from error
        raise ValueError(
            f"checkpoint {path} holds a Python object ({unsafe.group(1)}) beyond tensors and plain data; mf does "
            "not unpickle such objects because that can run code. If you trust the file, load it with "
            "trainer.plugins=mf_lightning.lit.checkpoints.AtomicCheckpointIO and weights_only: false"
        ) from error
    except Exception as error:  # torch.load fails on damaged bytes in many ways (RuntimeError, EOFError, IndexError, ...)
        raise corrupt(path, error) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict); give a .ckpt written by mf fit")
    return checkpoint


def corrupt(path: Path, error: BaseException) -> ValueError:
    """The error for a checkpoint file that cannot be read."""
    reason = str(error).split(". ")[0].strip() or type(error).__name__
    return ValueError(
        f"checkpoint {path} cannot be read ({reason}): it is truncated, corrupt or not a checkpoint; "
        f"use another checkpoint from {path.parent} or start over without --ckpt_path"
    )


def stamp_checkpoint(
    checkpoint: dict[str, Any],
    model_config: dict[str, Any],
    tokenizer: str | None,
    tokenizer_state: dict[str, str] | None = None,
) -> None:
    """Records what ``check_checkpoint`` compares (the model config, the tokenizer's fingerprint) and the
    tokenizer itself, so a checkpoint alone is enough to export, evaluate or generate."""
    checkpoint[MODEL_CONFIG_KEY] = model_config
    if tokenizer is not None:
        checkpoint[TOKENIZER_KEY] = tokenizer
    if tokenizer_state is not None:
        checkpoint[TOKENIZER_STATE_KEY] = tokenizer_state


def check_checkpoint(
    checkpoint: dict[str, Any],
    model_config: dict[str, Any],
    tokenizer: str | None,
    expected_state: Mapping[str, torch.Tensor],
    path: _PATH | None = None,
) -> None:
    """Raise a ``ValueError`` naming both sides if ``checkpoint`` was not saved from this model and tokenizer.

    Compares the stored model config field by field (``RUNTIME_FIELDS`` may differ), the stored
    tokenizer fingerprint, then tensor names and shapes of ``checkpoint["state_dict"]`` (align its keys
    first with ``align_state_keys``) against ``expected_state``.
    """
    where = f"checkpoint {path}" if path else "the checkpoint"
    fix = (
        "run with the config the checkpoint was trained with (saved as tensorboard/config.yaml in its run folder), "
        "or give another --ckpt_path / trainer.default_root_dir"
    )
    saved = checkpoint.get(MODEL_CONFIG_KEY)
    if saved is not None:
        differences = [
            f"{name}={saved.get(name)!r} in the checkpoint, {value!r} in the config"
            for name, value in model_config.items()
            if name not in RUNTIME_FIELDS and saved.get(name) != value
        ]
        if differences:
            raise ValueError(f"{where} holds another model: {'; '.join(differences)}; {fix}")
    saved_tokenizer = checkpoint.get(TOKENIZER_KEY)
    if saved_tokenizer is not None and tokenizer is not None and saved_tokenizer != tokenizer:
        raise ValueError(
            f"{where} was trained on tokens of tokenizer {saved_tokenizer!r}, but data.tokenizer gives {tokenizer!r}; "
            "use the tokenizer the checkpoint was trained with"
        )
    problems = state_problems(checkpoint["state_dict"], expected_state)
    if problems:
        raise ValueError(f"{where} does not fit the model: {'; '.join(problems)}; {fix}")


def align_state_keys(state: Mapping[str, torch.Tensor], expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` with keys renamed to ``expected``'s where they differ only by ``torch.compile``'s ``_orig_mod.``."""
    by_plain_name = {key.replace(COMPILE_PREFIX, ""): key for key in expected}
    return {by_plain_name.get(key.replace(COMPILE_PREFIX, ""), key): value for key, value in state.items()}




def check_run_folder(subcommand: str, ckpt_path: str | None, dirpath: str) -> None:
    """Refuses a fit that would overwrite another run's checkpoints, and an evaluation of ``last`` without one.

    A fresh ``fit`` (no ``ckpt_path``, or ``last`` with no last checkpoint) in a folder that holds
    checkpoints would replace them, so it must resume (``--ckpt_path last``) or use another folder.
    ``validate``/``test``/``predict`` with ``last`` and no last checkpoint would evaluate an untrained
    model (Lightning only warns), so that is an error. Remote folders (``s3://``...) are not checked.
    """
    folder = Path(dirpath)
    if "://" in dirpath or not folder.is_dir():
        lasts, others = [], []
    else:
        lasts = sorted(path.name for path in folder.glob("last*.ckpt"))
        others = sorted(path.name for path in folder.glob("*.ckpt"))
    if subcommand != "fit":
        if ckpt_path == "last" and not lasts:
            raise FileNotFoundError(
                f"--ckpt_path last: {folder} holds no last checkpoint to {subcommand}; train it first with "
                "mf fit and this config, or give a checkpoint file"
            )
        return
    fresh = ckpt_path is None or (ckpt_path == "last" and not lasts)
    if fresh and others:
        raise ValueError(
            f"{folder} already holds checkpoints of a run ({', '.join(others)}); a new run would overwrite them: "
            "resume it with --ckpt_path last, or start the new run in another --trainer.default_root_dir "
            "(or delete those files)"
        )
