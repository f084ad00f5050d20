"""A callback that SIGKILLs its own process once per test, for the torchrun ``--max-restarts`` tests."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning.pytorch as pl


class KillOnce(pl.Callback):
    """SIGKILLs the process of global rank ``rank`` when a training batch starts at optimizer step ``step``, unless
    the file ``marker`` exists (it is created first): the workers torchrun restarts pass that step again and must
    train on through it."""

    def __init__(self, step: int, rank: int, marker: str) -> None:
        self.step, self.rank, self.marker = step, rank, Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and not self.marker.exists():
            self.marker.write_text(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
