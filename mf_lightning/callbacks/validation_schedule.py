"""``ValidationSchedule``: validate, and so checkpoint, every N optimizer steps and after the final step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from mf_lightning.checks import positive_int


class ValidationSchedule(pl.Callback):
    """Validation every ``every_n_steps`` optimizer steps, for any accumulation, device count and epoch length.

    Lightning counts ``val_check_interval`` in micro-batches and, by default, restarts the count at
    every epoch, so an interval meant in optimizer steps drifts with ``accumulate_grad_batches`` and
    with the epoch length. :meth:`trainer_arguments` gives the Trainer the equivalent count of
    micro-batches, never restarted (``check_val_every_n_epoch=None``); the CLI passes them. Each rank
    runs the same micro-batches per step, so the count holds for any number of devices.

    When the run reaches ``trainer.max_steps`` off that grid, this callback asks the trainer to stop after
    the step, which makes Lightning validate first: the checkpoints taken at validation (``last.ckpt``
    and the best) then always include the final model instead of dropping the last steps.
    """

    def __init__(self, every_n_steps: int = 500) -> None:
        self.every_n_steps = positive_int("validation.every_n_steps", every_n_steps)

    def trainer_arguments(self, accumulate_grad_batches: int) -> dict[str, Any]:
        """The ``Trainer`` arguments that validate every ``every_n_steps`` optimizer steps."""
        accumulate = positive_int("trainer.accumulate_grad_batches", accumulate_grad_batches)
        return {"val_check_interval": self.every_n_steps * accumulate, "check_val_every_n_epoch": None}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True
