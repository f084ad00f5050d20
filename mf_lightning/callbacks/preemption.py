"""``PreemptionCheckpoint``: on SIGTERM, SIGUSR1 or SIGINT (SLURM, Kubernetes, a spot preemption, Ctrl-C) every rank
stops at one optimizer step and ``last.ckpt`` is saved before exiting; after SIGUSR1 a SLURM job is requeued."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mf_lightning.lit.checkpoints import AtomicModelCheckpoint
from mf_lightning.lit.lightning_private import keep_signal_handlers, mark_sigterm_received
from mf_lightning.lit.slurm_requeue import requeue_slurm_job
from mf_lightning.lit.stop_signals import STOP_SIGNALS, STOP_SIGNALS_HANDLER, signal_names


class PreemptionCheckpoint(pl.Callback):
    """Stops a fit at an optimizer step that every rank agrees on when any rank gets SIGTERM, SIGUSR1 or SIGINT,
    and saves ``last.ckpt``.

    The signals are this process's ``STOP_SIGNALS_HANDLER`` (``mf_lightning.lit.stop_signals``; ``mf fit``
    installs it before anything else, this callback does at ``setup`` otherwise), and Lightning is kept from
    installing its own (``keep_signal_handlers``): its SIGTERM handler broadcasts from inside the signal
    handler of whichever rank got the signal, which hangs a multi-rank job, and its SLURM SIGUSR1 handler
    writes a stray ``hpc_ckpt_*.ckpt`` mid-step. While the fit loop runs (from the sanity check to the end of
    training, validations and saves included) the handler only notes a signal, and after it only records one
    (``release_signals``). After every optimizer step all ranks reduce their notes
    (``strategy.reduce_boolean_decision``, any strategy: single device, DDP, FSDP); if any rank got one, every
    rank marks the trainer as having received SIGTERM at that same step, and Lightning stops them all after the
    batch (after the first batch of a validation that was due), raising ``SIGTERMException``. Then each rank
    saves the checkpoint callback's ``last.ckpt`` together, from ``on_exception``, so ``--ckpt_path last``
    continues exactly where the run stopped, and ``mf fit`` exits with status 143 (130 for SIGINT alone).
    After SIGUSR1 under SLURM, rank 0 then requeues the job (``requeue_slurm_job``).

    The stop is always at an optimizer step: under gradient accumulation a batch can end inside an
    accumulation window, whose gradients no checkpoint holds, so a signal waits for the window's step
    (at most ``accumulate_grad_batches`` batches, plus a validation that was running). A signal after
    the final step lets the run finish normally.

    The save never replaces another run's checkpoint: if ``last.ckpt`` exists but this run neither
    wrote nor resumed from it, the state goes to ``preempted-step=N-pid=P.ckpt`` beside it instead.
    Other exceptions (a crash, a second Ctrl-C, which can land mid-update) save nothing: resuming falls back
    to the last periodic checkpoint.
    """

    def __init__(self) -> None:
        self.signals = STOP_SIGNALS_HANDLER
        self.installed_here = False
        self.at_step_boundary = True
        self.step_at_batch_start = 0
        self.agreed: set[int] = set()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        keep_signal_handlers(trainer)
        if not self.signals.installed:
            self.signals.install()
            self.installed_here = True
        self.signals.stop()  # a stage of this process after a fit (an evaluation) is stopped by a signal again

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release_signals()

    def release_signals(self) -> None:
        """From now on only records signals (``StopSignals.finish``: the stop, if any, is done, and the clean-up
        after it must complete), and gives the handlers back if ``setup`` installed them (Lightning calls
        ``teardown`` after a run that ended normally, ``on_exception`` after one that did not)."""
        self.signals.finish()
        if self.installed_here:
            self.signals.uninstall()
            self.installed_here = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signals.received.clear()  # a signal that stopped an earlier fit of this process is not this fit's
        self.agreed = set()

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signals.note()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signals.note()

    @property
    def received(self) -> bool:
        """Whether this rank got a stop signal during the fit."""
        return bool(self.signals.received)

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
        """Marks the trainer as having received SIGTERM (on every rank, at this same step) and says which ranks got
        which signal.

        Lightning raises ``SIGTERMException`` once the batch is complete when ``trainer.received_sigterm``
        is set (``mark_sigterm_received``).
        """
        mask = sum(1 << index for index, signum in enumerate(STOP_SIGNALS) if signum in self.signals.received)
        masks = trainer.strategy.all_gather(torch.tensor([mask], device=trainer.strategy.root_device))
        by_rank = {
            rank: {signum for index, signum in enumerate(STOP_SIGNALS) if value >> index & 1}
            for rank, value in enumerate(masks.reshape(-1).tolist())
        }
        self.agreed = set().union(*by_rank.values())
        self.signals.agreed = self.agreed
        senders = ", ".join(str(rank) for rank, signums in by_rank.items() if signums)
        rank_zero_info(
            f"{signal_names(self.agreed)} received by rank {senders} of {trainer.world_size}: "
            f"every rank stops after step {trainer.global_step} and saves"
        )
        mark_sigterm_received(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Saves ``last.ckpt`` after an agreed stop (a signal arriving meanwhile is only noted), then ``release_signals``."""
        try:
            self.save_after_stop(trainer, exception)
        finally:
            self.release_signals()

    def save_after_stop(self, trainer: pl.Trainer, exception: BaseException) -> None:
        """The save of ``on_exception`` (nothing unless ``exception`` is the agreed stop of a fit), and the requeue."""
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        checkpoint, names = trainer.checkpoint_callback, signal_names(self.agreed or {signal.SIGTERM})
        if not isinstance(checkpoint, ModelCheckpoint) or checkpoint.dirpath is None:
            rank_zero_warn(f"{names} received, but there is no ModelCheckpoint to say where last.ckpt goes; not saved")
            return
        if not self.at_step_boundary:
            rank_zero_warn(
                f"{names} stopped the run inside a gradient-accumulation window, which cannot be saved exactly; "
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
        rank_zero_info(f"{names} received: saved {path} at step {trainer.global_step}; resume with {resume}")
        if signal.SIGUSR1 in self.agreed and trainer.is_global_zero:
            requeued = requeue_slurm_job()
            if requeued is not None:
                rank_zero_info(requeued)

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
