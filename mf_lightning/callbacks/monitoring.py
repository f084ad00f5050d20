"""What every Memory Layer monitor needs: the layers of a model, argument checks, and where to write."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from mf_lightning.checks import positive_int
from mf_lightning.nn import MemoryLayer

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


def memory_layers(module: nn.Module) -> dict[str, MemoryLayer]:
    """Every ``MemoryLayer`` inside ``module``, keyed by its module path (e.g. ``blocks.0.attn.qkv``)."""
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, MemoryLayer)}


def check_every_n_steps(name: str, value: int) -> int:
    """Return ``value`` if it is a positive integer number of steps; raise a clear error otherwise."""
    return positive_int(name, value, "a positive integer number of optimizer steps")


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Write scalars to every logger of the trainer (TensorBoard, CSV, W&B, ...)."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def tensorboard_writers(trainer: pl.Trainer) -> list[SummaryWriter]:
    """The ``SummaryWriter`` of each TensorBoard logger: the loggers that take histograms and images."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
