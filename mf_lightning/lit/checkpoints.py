"""Checkpoint files that survive crashes and hostile input.

Writing: ``AtomicCheckpointIO`` (installed by ``mf`` as the trainer's checkpoint plugin) writes every
checkpoint with ``mf_lightning.fs.atomic.atomic_file`` (a temporary file in the target's folder, fsynced,
renamed over the target, the folder fsynced), so a kill at any moment leaves either the previous complete
file or the new complete file, never a truncated one. (Lightning's own ``_atomic_save`` stages the
file in the system temporary folder and moves it, which is a plain copy when that folder is on
another file system, and never fsyncs.) ``AtomicModelCheckpoint`` does the same for
``save_last="link"``, whose symbolic link Lightning replaces by deleting the old one first. Every
checkpoint carries the digests of its tensors (``mf_lightning.lit.checkpoint_digests``).

Reading (``mf_lightning.lit.checkpoint_files``): checkpoints are loaded with ``torch.load(weights_only=True)``,
which refuses to unpickle anything but tensors and plain containers, so loading a checkpoint cannot run
code from it, and its tensors are checked against their digests. A missing, truncated, corrupt, damaged
or foreign file is one clear error naming it. ``check_checkpoint`` compares what
a checkpoint holds (model config, tokenizer, tensor shapes) with the model it is loaded into.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from mf_lightning.config import check_format
from mf_lightning.fs.atomic import atomic_file, partial_path, remove_abandoned
from mf_lightning.fs.remote import is_remote
from mf_lightning.lit.checkpoint_digests import with_digests
from mf_lightning.lit.checkpoint_files import load_file
from mf_lightning.lit.distributed_checkpoint import is_sharded_checkpoint, read_sharded_checkpoint
from mf_lightning.lit.lightning_private import ModelCheckpointSteps, validates_after_this_batch
from mf_lightning.models.pretrained import COMPILE_PREFIX, RUNTIME_FIELDS, state_problems

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

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        checkpoint = with_digests(checkpoint)
        if storage_options is not None or is_remote(path):
            super().save_checkpoint(checkpoint, path, storage_options)
        else:
            atomic_save(checkpoint, Path(path))

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | str | torch.device | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return read_checkpoint(path, map_location, self.weights_only if weights_only is None else weights_only)


class AtomicModelCheckpoint(ModelCheckpointSteps):
    """``ModelCheckpoint`` whose ``last.ckpt`` holds the latest validated or final model and is continued on resume.

    - **Current.** Lightning 2.6 writes ``last`` only beside a new top-k file (or an
      ``every_n_train_steps`` save), so a validation that is not a new best would leave ``last.ckpt``, and
      ``--ckpt_path last``, at an older step. Here every validation during fit, and the end of training,
      saves ``last`` unless a save at that step already wrote it; under ``save_last="link"`` that save is
      a full file (the newest top-k file holds an older model), replaced by a link at the next top-k save.
    - **Continued.** Lightning versions ``last`` (``last-v1.ckpt`` ...) whenever a ``last.ckpt`` it did not
      write this run exists, which happens on every resume whose checkpoint did not record it (a SIGTERM
      save before any periodic one, an older checkpoint) and after the run folder was moved or copied. A
      run owns ``last.ckpt`` when the folder held none or the run resumed from a checkpoint in this folder
      (``mf fit`` refuses any other case before starting, see ``check_run_folder``), and then continues it.
      The paths a checkpoint's callback state records (best, top-k, last) are moved along with the folder
      when it was moved or copied, so the best model keeps being tracked instead of being saved twice.
    - **Atomic link.** Lightning deletes the old ``save_last="link"`` link and then creates the new one; a
      kill between the two would leave no ``last.ckpt``. Here the link is made under a temporary name and
      renamed over the old one. Full files are made atomic by ``AtomicCheckpointIO``.

    ``last_path`` is the one place that names the last checkpoint; ``PreemptionCheckpoint`` saves there too.
    """

    def last_path(self) -> str:
        """Where this callback's last checkpoint lives (``dirpath/last.ckpt``); ``dirpath`` is set at ``setup``."""
        return os.path.join(str(self.dirpath), self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def owns_last(self, trainer: pl.Trainer) -> bool:
        """Whether this run continues ``last_path()``: none exists yet, or the run resumed from this folder."""
        if not os.path.lexists(self.last_path()):
            return True
        resumed_from = trainer.ckpt_path
        return bool(resumed_from) and same_folder(Path(resumed_from).parent, Path(str(self.dirpath)))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.save_last and not is_remote(str(self.dirpath)) and self.owns_last(trainer):
            self.last_model_path = self.last_path()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """A periodic save (``every_n_train_steps``, ``train_time_interval``) that falls on a validation step waits
        for that validation (``defer_save_to_validation``): the best file is then chosen by this step's score, and
        ``last`` holds the validated state, as at every other validation."""
        if self.monitor is not None and validates_after_this_batch(trainer):
            self.defer_save_to_validation()
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.save_last_if_behind(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.save_last_if_behind(trainer)

    def save_last_if_behind(self, trainer: pl.Trainer) -> None:
        """Saves ``last`` with the current state during fit unless a save at this step (top-k, periodic) wrote it.

        Saves nothing where ``ModelCheckpoint`` would not (``skips_saving``: fit only, no sanity check or
        fast_dev_run, nothing saved at this global step yet). A run that does not own the folder's
        ``last.ckpt`` (``owns_last``) leaves it alone: ``save_new_last`` then picks a versioned name.
        """
        if not self.save_last or self.skips_saving(trainer):
            return
        if not self.last_model_path:
            self.save_new_last(trainer)
            return
        self.save_to(trainer, self.last_model_path)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(self.moved_with_the_folder(state_dict))

    def moved_with_the_folder(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with its checkpoint paths re-rooted here when its folder was moved or copied to ``dirpath``.

        That is the case when every top-k file it records exists under the same name in ``dirpath``;
        otherwise (a checkpoint of another folder) it is returned unchanged and Lightning keeps only
        ``best_model_path``.
        """
        old, new = state_dict.get("dirpath"), self.dirpath
        if not old or not new or old == new or is_remote(str(new)):
            return state_dict

        def moved(path: str) -> str | None:
            candidate = os.path.join(str(new), os.path.basename(path))
            return candidate if os.path.dirname(path) == old and os.path.exists(candidate) else None

        best_k = {moved(path): score for path, score in state_dict.get("best_k_models", {}).items()}
        if None in best_k:
            return state_dict
        paths = ("best_model_path", "kth_best_model_path", "last_model_path")
        return {
            **state_dict,
            "dirpath": new,
            "best_k_models": best_k,
            **{key: moved(state_dict[key]) or "" for key in paths if state_dict.get(key)},
        }

    @staticmethod
    def link_last(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        """Points ``linkpath`` at ``filepath`` through a link made under a temporary name and renamed over it."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            temporary = partial_path(Path(linkpath))
            os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), temporary)
            os.replace(temporary, linkpath)
        trainer.strategy.barrier()


def atomic_save(checkpoint: dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` with ``atomic_file``, first removing what killed writers left in its folder."""
    remove_abandoned(path.parent)
    with atomic_file(path, "saving a checkpoint") as file:
        try:
            torch.save(checkpoint, file)
        except RuntimeError as error:  # torch's zip writer hides a failed write (full disk) behind its own error
            if isinstance(error.__context__, OSError):
                raise error.__context__ from error
            raise


def read_checkpoint(
    path: str | os.PathLike,
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
    checkpoint = load_file(path, map_location, weights_only, mmap)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict); give a .ckpt written by mf fit")
    return checkpoint


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
    path: str | os.PathLike | None = None,
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
        try:
            check_format(saved)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
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
    """Refuses a fit that would mix two runs' checkpoints in one folder, and an evaluation of ``last`` without one.

    A fresh ``fit`` (no ``ckpt_path``, or ``last`` with no last checkpoint) in a folder that holds
    checkpoints would replace them, so it must resume (``--ckpt_path last``) or use another folder. A fit
    resuming a checkpoint file of another folder into a folder that holds checkpoints would continue a
    ``last.ckpt`` it did not write, so it is refused too: a folder's checkpoints are one run's.
    ``validate``/``test``/``predict`` with ``last`` and no last checkpoint would evaluate an untrained
    model (Lightning only warns), so that is an error. Remote folders (``s3://``...) are not checked.
    """
    folder = Path(dirpath)
    lasts = last_checkpoints(dirpath)
    others = [] if is_remote(dirpath) or not folder.is_dir() else sorted(path.name for path in folder.glob("*.ckpt"))
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
    elsewhere = ckpt_path is not None and os.path.isfile(ckpt_path) and not same_folder(Path(ckpt_path).parent, folder)
    if others and elsewhere:
        raise ValueError(
            f"--ckpt_path {ckpt_path} is a checkpoint of another folder, but {folder} holds checkpoints of a run "
            f"({', '.join(others)}); continuing it there would mix two runs: resume in the checkpoint's own "
            "--trainer.default_root_dir, or start from it in an empty one"
        )


def last_checkpoints(dirpath: str) -> list[str]:
    """The names of the ``last`` checkpoints (``last.ckpt``, ``last-v1.ckpt``, files or sharded folders) in
    ``dirpath``; none for a missing folder, and for a remote one (not looked at)."""
    folder = Path(dirpath)
    if is_remote(dirpath) or not folder.is_dir():
        return []
    return sorted(path.name for path in folder.glob("last*.ckpt"))


def same_folder(first: Path, second: Path) -> bool:
    """Whether two paths name one folder (after resolving links)."""
    return os.path.realpath(first) == os.path.realpath(second)
