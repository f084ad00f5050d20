"""``PreemptionCheckpoint``: on SIGTERM (SLURM, Kubernetes, a spot preemption) save ``last.ckpt`` before exiting."""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(pl.Callback):
    """Saves the checkpoint callback's ``last.ckpt`` when Lightning stops a fit because of SIGTERM.

    Lightning's SIGTERM handler only sets a flag; its loops raise ``SIGTERMException`` (a
    ``SystemExit``) at the next safe point, after a complete training batch (or mid-validation), on
    every DDP rank at once. This callback saves then, from ``on_exception``, so ``--ckpt_path last``
    continues exactly where the run stopped; the process then exits normally.

    Under gradient accumulation a batch can end inside an accumulation window, whose gradients no
    checkpoint holds (under DDP they are not even synchronised yet), so a save there could not resume
    exactly. While training, this callback therefore holds a SIGTERM back until the next optimizer step
    and hands it to Lightning's handler then: the run stops at most ``accumulate_grad_batches`` batches
    later (plus a validation that was running), at a point a resumed run reproduces bit for bit.

    The save never replaces another run's checkpoint: if ``last.ckpt`` exists but this run neither
    wrote nor resumed from it, the state goes to ``preempted-step=N-pid=P.ckpt`` beside it instead.
    Other exceptions (a crash, Ctrl-C, which can land mid-update) save nothing: resuming falls back to
    the last periodic checkpoint.
    """

    def __init__(self) -> None:
        self.lightning_handler: Any = None
        self.held_back: tuple[int, FrameType | None] | None = None
        self.at_step_boundary = True
        self.step_at_batch_start = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Puts ``hold_back`` in front of the SIGTERM handler Lightning registered before training started."""
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):
            self.lightning_handler = handler
            signal.signal(signal.SIGTERM, self.hold_back)

    def hold_back(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM handler during training: keeps the signal until the next optimizer step has been taken.

        Lightning checks its flag after each training batch, so a signal passed on at once could stop
        the run after the first batch of a window even when it arrived between two windows.
        """
        self.held_back = (signum, frame)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.step_at_batch_start = trainer.global_step
        self.at_step_boundary = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step_at_batch_start:
            self.at_step_boundary = True
            self.pass_on()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore_handler()

    def pass_on(self) -> None:
        """Hands a held-back SIGTERM to Lightning's handler, which makes the loop stop after this batch."""
        if self.held_back is not None:
            signum, frame = self.held_back
            self.held_back = None
            self.lightning_handler(signum, frame)

    def restore_handler(self) -> None:
        """Gives the SIGTERM handler (and any signal held back) to Lightning, which restores the original at teardown."""
        if self.lightning_handler is not None and signal.getsignal(signal.SIGTERM) == self.hold_back:
            signal.signal(signal.SIGTERM, self.lightning_handler)
            self.pass_on()
        self.lightning_handler = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.restore_handler()
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        checkpoint = trainer.checkpoint_callback
        if not isinstance(checkpoint, ModelCheckpoint) or checkpoint.dirpath is None:
            rank_zero_warn("SIGTERM received, but there is no ModelCheckpoint to say where last.ckpt goes; not saved")
            return
        if not self.at_step_boundary:
            rank_zero_warn(
                "SIGTERM stopped the run inside a gradient-accumulation window, which cannot be saved exactly; "
                "not saved: resume from the last periodic checkpoint with --ckpt_path last"
            )
            return
        path = os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
        resume = "the same command plus --ckpt_path last"
        if os.path.lexists(path) and not self.owns(trainer, checkpoint, path):
            path = os.path.join(checkpoint.dirpath, f"preempted-step={trainer.global_step}-pid={os.getpid()}.ckpt")
            resume = f"--ckpt_path {path} (last.ckpt belongs to another run and was left alone)"
        trainer.save_checkpoint(path, weights_only=False)  # the full state; saying so keeps Lightning from logging its default
        rank_zero_info(f"SIGTERM received: saved {path} at step {trainer.global_step}; resume with {resume}")

    @staticmethod
    def owns(trainer: pl.Trainer, checkpoint: ModelCheckpoint, path: str) -> bool:
        """Whether this run wrote ``path`` (through ``checkpoint``) or resumed from it."""
        mine = {checkpoint.last_model_path, trainer.ckpt_path}
        return any(candidate and os.path.abspath(candidate) == os.path.abspath(path) for candidate in mine)
