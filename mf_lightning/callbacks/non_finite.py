"""``NonFiniteGuard``: skip optimizer steps whose loss or gradients are not finite, stop a diverged run."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer

from mf_lightning.callbacks.monitoring import check_every_n_steps


class NonFiniteTrainingError(RuntimeError):
    """Raised when too many optimizer steps in a row had a non-finite loss or gradients."""


class NonFiniteGuard(pl.Callback):
    """Skips every optimizer step with a NaN/inf loss or gradient; stops after ``max_consecutive`` in a row.

    The loss of each micro-batch is checked in ``on_before_backward``, the gradients in
    ``on_before_optimizer_step`` (after accumulation, unscaling and the DDP all-reduce, before
    clipping). A bad step gets its gradients set to ``None``, so the optimizer leaves every parameter
    and its state (moments, step count, weight decay) untouched; the learning-rate schedule and
    ``global_step`` still advance, as with a step skipped by fp16's GradScaler. The verdict is
    reduced over ranks (bad anywhere means bad everywhere), so DDP replicas never diverge.

    Under a GradScaler (``precision="16-mixed"``) inf/NaN gradients are the scaler's business: it
    skips those steps and lowers its scale, which is normal early in training, so they are neither
    counted nor touched here; a non-finite loss still is. Skipped steps so far are logged as
    ``train/skipped_steps``, each with a warning; ``max_consecutive`` bad steps in a row raise
    ``NonFiniteTrainingError``. The counters are saved in checkpoints.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        self.max_consecutive = check_every_n_steps("max_consecutive", max_consecutive)
        self.skipped_steps = 0
        self.consecutive = 0
        self._loss_finite: torch.Tensor | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        finite = torch.ones((), dtype=torch.bool) if self._loss_finite is None else self._loss_finite.cpu()
        self._loss_finite = None
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            finite = finite & gradients_finite(parameters).cpu()
        if trainer.strategy.reduce_boolean_decision(bool(finite), all=True):
            self.consecutive = 0
        else:
            self.skip(trainer, parameters)
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def skip(self, trainer: pl.Trainer, parameters: list[torch.nn.Parameter]) -> None:
        """Drops the gradients of this step, counts it, and raises once too many came in a row."""
        for parameter in parameters:
            parameter.grad = None
        self.skipped_steps += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"{self.consecutive} optimizer steps in a row (up to step {trainer.global_step}) had a non-finite "
                "loss or gradients: training diverged. Resume from an earlier checkpoint with a lower model.lr, "
                "keep trainer.gradient_clip_val, or use bf16-mixed instead of 16-mixed precision "
                "(non_finite.max_consecutive sets this limit)"
            )
        rank_zero_warn(
            f"step {trainer.global_step}: non-finite loss or gradients, optimizer step skipped "
            f"({self.consecutive} in a row; the run stops at non_finite.max_consecutive={self.max_consecutive})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict["skipped_steps"]
        self.consecutive = state_dict["consecutive"]


def gradients_finite(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """Whether every gradient of ``parameters`` is finite, as a bool tensor (true when none has one)."""
    gradients = [p.grad for p in parameters if p.grad is not None]
    if not gradients:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.nn.utils.get_total_norm(gradients, error_if_nonfinite=False))
