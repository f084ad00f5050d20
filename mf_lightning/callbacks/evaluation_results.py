"""Where ``mf validate`` and ``mf test`` log: a TensorBoard run of their own, at the step the checkpoint reached.

Lightning logs an evaluation outside ``fit`` at step 0 (its loops start from zero when only the weights are
restored), which draws a lone point at the start of every chart. The checkpoint's step places it where the
evaluated weights are on the training's curves: a fit logs the validation that follows optimizer step ``n``
(and saves its checkpoints, whose ``global_step`` is ``n``) at step ``n - 1``, Lightning's count of the
batches that stepped before the last one's step was counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from mf_lightning.lit.run_logger import RunLogger


class EvaluationLogger(RunLogger):
    """A ``RunLogger`` that logs every metric at ``checkpoint_step`` (0 until a checkpoint is loaded)."""

    checkpoint_step: int = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, self.checkpoint_step)


class CheckpointStep(pl.Callback):
    """Hands the step at which the fit logged the loaded checkpoint's validation (see the module) to every
    ``EvaluationLogger`` of the trainer."""

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, EvaluationLogger):
                logger.checkpoint_step = max(int(checkpoint.get("global_step", 0)) - 1, 0)
