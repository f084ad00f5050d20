"""A callback that signals its own process at a chosen batch, for the SIGTERM/SIGKILL tests (also in subprocesses)."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class SignalAt(pl.Callback):
    """Sends ``signum`` to this process when the ``batch``-th (0-based, over the run) ``stage`` batch starts.

    ``stage`` is ``"train"`` (micro-batches, so inside accumulation windows too) or ``"validation"``.
    ``rank`` limits the signal to the process of that global rank (all ranks when ``None``).
    """

    def __init__(
        self, batch: int, signum: int = int(signal.SIGTERM), stage: str = "train", rank: int | None = None
    ) -> None:
        self.batch, self.signum, self.stage, self.rank, self.started = batch, signum, stage, rank, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.stage == "train":
            self.count(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.stage == "validation" and not trainer.sanity_checking:
            self.count(trainer)

    def count(self, trainer) -> None:
        if self.started == self.batch and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)
        self.started += 1
