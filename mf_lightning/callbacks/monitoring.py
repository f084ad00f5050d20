"""What every Memory Layer monitor needs: the layers of a model, argument checks, and where to write."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from mf_lightning.checks import positive_int
from mf_lightning.nn import MemoryLayer

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


def memory_tag(group: str, name: str) -> str:
    """The tag of a Memory Layer diagnostic: ``memory_<group>/<name>``, e.g. ``memory_used_fraction/blocks.0.qkv``.

    Every monitor's group starts with ``memory_``, so TensorBoard lists them together and after the loss and
    the learning rate (its Time Series tab sorts the groups by character code and opens the first two; see
    ``mf_lightning.lit.module.metric_tag``).
    """
    return f"memory_{group}/{name}"


def memory_layers(module: nn.Module) -> dict[str, MemoryLayer]:
    """Every ``MemoryLayer`` inside ``module``, keyed by its module path (e.g. ``blocks.0.attn.qkv``)."""
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, MemoryLayer)}


def block_and_kind(path: str) -> tuple[str, str]:
    """Splits a layer path into the module holding the layer and the layer's own name, the layer's kind.

    ``model.blocks.0.qkv`` -> ``("model.blocks.0", "qkv")``; a layer at the top of the model has the
    block ``"model"``. Layers of one block, or of one kind across blocks, are compared side by side.
    """
    block, _, kind = path.rpartition(".")
    return block or "model", kind


def group_layers(paths: Iterable[str], by: str) -> dict[str, list[str]]:
    """Layer paths grouped by ``"block"`` or ``"kind"`` (see ``block_and_kind``), in first-seen order."""
    if by not in ("block", "kind"):
        raise ValueError(f"layers group by 'block' or 'kind', got {by!r}")
    groups: dict[str, list[str]] = {}
    for path in paths:
        block, kind = block_and_kind(path)
        groups.setdefault(block if by == "block" else kind, []).append(path)
    return groups


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
