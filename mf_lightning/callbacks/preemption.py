"""``PreemptionCheckpoint``: on SIGTERM (SLURM, Kubernetes, a spot preemption) save ``last.ckpt`` before exiting."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(pl.Callback):
    """Saves the checkpoint callback's ``last.ckpt`` when Lightning stops a fit because of SIGTERM.

    Lightning's SIGTERM handler only sets a flag; its loops raise ``SIGTERMException`` (a
    ``SystemExit``) at the next safe point, after a complete training step (or mid-validation), on
    every DDP rank at once. This callback saves then, from ``on_exception``, so the state is whole and
    ``--ckpt_path last`` continues exactly where the run stopped; the process then exits normally.
    Other exceptions (a crash, Ctrl-C, which can land mid-update) save nothing: resuming falls back to
    the last periodic checkpoint.
    """

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        checkpoint = trainer.checkpoint_callback
        if not isinstance(checkpoint, ModelCheckpoint) or checkpoint.dirpath is None:
            rank_zero_warn("SIGTERM received, but there is no ModelCheckpoint to say where last.ckpt goes; not saved")
            return
        path = os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
        trainer.save_checkpoint(path, weights_only=False)  # the full state; saying so keeps Lightning from logging its default
        rank_zero_info(
            f"SIGTERM received: saved {path} at step {trainer.global_step}; "
            "resume with the same command plus --ckpt_path last"
        )
