"""``PreemptionCheckpoint``: on SIGTERM (SLURM, Kubernetes, a spot preemption) every rank stops at one optimizer
step and ``last.ckpt`` is saved before exiting."""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mf_lightning.lit.checkpoints import AtomicModelCheckpoint
from mf_lightning.lit.lightning_private import mark_sigterm_received


class PreemptionCheckpoint(pl.Callback):
    """Stops a fit at an optimizer-step boundary that every rank agrees on when any rank gets SIGTERM, and saves.

    Lightning 2.6's own SIGTERM handler is unsafe with several ranks: it runs a ``broadcast`` inside the
    signal handler of whichever rank got the signal, which no other rank matches, so a SIGTERM to one
    worker (one node of a job preempted) hangs the job. While a fit runs (from the sanity check to the
    end of training) this callback's handler takes its place and only notes the signal. After every
    optimizer step all ranks reduce their notes (``strategy.reduce_boolean_decision``, any strategy:
    single device, DDP, FSDP); if any rank got SIGTERM, every rank marks the trainer as having received
    it at that same step, and Lightning stops them all after the batch (after the first batch of a
    validation that was due), raising ``SIGTERMException``. Then each rank saves the checkpoint callback's
    ``last.ckpt`` together, from ``on_exception``, so ``--ckpt_path last`` continues exactly where the
    run stopped, and ``mf fit`` exits with status 143 (128 + SIGTERM).

    The stop is always at an optimizer step: under gradient accumulation a batch can end inside an
    accumulation window, whose gradients no checkpoint holds, so a SIGTERM waits for the window's step
    (at most ``accumulate_grad_batches`` batches, plus a validation that was running). A SIGTERM after
    the final step lets the run finish normally.

    The save never replaces another run's checkpoint: if ``last.ckpt`` exists but this run neither
    wrote nor resumed from it, the state goes to ``preempted-step=N-pid=P.ckpt`` beside it instead.
    Other exceptions (a crash, Ctrl-C, which can land mid-update) save nothing: resuming falls back to
    the last periodic checkpoint.
    """

    def __init__(self) -> None:
        self.lightning_handler: Any = None
        self.received = False
        self.at_step_boundary = True
        self.step_at_batch_start = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received = False  # a signal that stopped an earlier fit of this callback is not this fit's

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.intercept()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.intercept()

    def intercept(self) -> None:
        """Puts ``note`` in place of the SIGTERM handler Lightning registered for this fit."""
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler) and handler != self.note:
            self.lightning_handler = handler
            signal.signal(signal.SIGTERM, self.note)

    def note(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM handler during a fit: only records the signal; the ranks act on it together at a step boundary."""
        self.received = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.step_at_batch_start = trainer.global_step
        self.at_step_boundary = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step_at_batch_start:
            return
        self.at_step_boundary = True
        if trainer.strategy.reduce_boolean_decision(self.received, all=False):
            self.stop_every_rank(trainer)

    def stop_every_rank(self, trainer: pl.Trainer) -> None:
        """Marks the trainer as having received SIGTERM (on every rank, at this same step) and says which ranks got it.

        Lightning raises ``SIGTERMException`` once the batch is complete when ``trainer.received_sigterm``
        is set (``mark_sigterm_received``).
        """
        flags = trainer.strategy.all_gather(torch.tensor([self.received], device=trainer.strategy.root_device))
        ranks = [str(rank) for rank, flag in enumerate(flags.reshape(-1).tolist()) if flag]
        rank_zero_info(
            f"SIGTERM received by rank {', '.join(ranks)} of {trainer.world_size}: "
            f"every rank stops after step {trainer.global_step} and saves"
        )
        mark_sigterm_received(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore_handler()

    def restore_handler(self) -> None:
        """Gives the SIGTERM handler back to Lightning, which restores the original one at teardown."""
        if self.lightning_handler is not None and signal.getsignal(signal.SIGTERM) == self.note:
            signal.signal(signal.SIGTERM, self.lightning_handler)
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
        path = last_path(checkpoint)
        resume = "the same command plus --ckpt_path last"
        if os.path.lexists(path) and not self.owns(trainer, checkpoint, path):
            path = os.path.join(checkpoint.dirpath, f"preempted-step={trainer.global_step}-pid={os.getpid()}.ckpt")
            resume = f"--ckpt_path {path} (last.ckpt belongs to another run and was left alone)"
        else:
            checkpoint.last_model_path = path  # the saved callback state records it, so the resumed run continues it
        trainer.save_checkpoint(
            path, weights_only=False
        )  # the full state; saying so keeps Lightning from logging its default
        rank_zero_info(f"SIGTERM received: saved {path} at step {trainer.global_step}; resume with {resume}")

    @staticmethod
    def owns(trainer: pl.Trainer, checkpoint: ModelCheckpoint, path: str) -> bool:
        """Whether this run wrote ``path`` (through ``checkpoint``) or resumed from it."""
        mine = {checkpoint.last_model_path, trainer.ckpt_path}
        return any(candidate and os.path.abspath(candidate) == os.path.abspath(path) for candidate in mine)


def last_path(checkpoint: ModelCheckpoint) -> str:
    """Where ``checkpoint`` keeps its last checkpoint: ``AtomicModelCheckpoint.last_path``, else ``dirpath/last.ckpt``."""
    if isinstance(checkpoint, AtomicModelCheckpoint):
        return checkpoint.last_path()
    return os.path.join(str(checkpoint.dirpath), checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
