"""The scalar tags a fit will log, named by the code that logs them, for the TensorBoard layout and HParams.

Each function asks the logging side itself: ``LanguageModel``'s metric names, the names
``LearningRateMonitor`` gave the parameter groups, the keys Lightning's ``Throughput`` computes, and
the tag functions and layers of our own monitors. Renaming a tag there renames it here; nothing is
copied. Call them once training has started (the learning-rate names exist from ``on_train_start``).
"""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import LearningRateMonitor, ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage

from mf_lightning.callbacks.bucket_usage import BucketUsageMonitor
from mf_lightning.callbacks.gradient_coverage import GradientCoverageMonitor
from mf_lightning.callbacks.monitoring import memory_layers
from mf_lightning.lit.module import (
    BALANCE_LOSS,
    BITS_PER_BYTE,
    LOSS,
    TRAIN,
    VAL,
    LanguageModel,
    metric_tag,
)
from mf_lightning.nn.hash_input import HashInput

TOKENS_PER_SECOND = "items_per_sec"
"""The key of Lightning's ``Throughput`` counting items (here tokens, ``length_fn``) per second."""


def loss_tags(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
    """``loss/train`` (and the balance loss when a Memory Layer input has one) and ``loss/val`` when validating."""
    if not isinstance(pl_module, LanguageModel):
        return []
    tags = [metric_tag(TRAIN, LOSS)]
    if any(isinstance(module, HashInput) and module.balance_weight > 0 for module in pl_module.modules()):
        tags.append(metric_tag(TRAIN, BALANCE_LOSS))
    if trainer.enable_validation:
        tags.append(metric_tag(VAL, LOSS))
    return tags


def bits_per_byte_tags(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
    """``val/bpb`` when the model validates on data that knows its bytes per token (as ``log_derived`` requires)."""
    datamodule = getattr(trainer, "datamodule", None)
    if (
        isinstance(pl_module, LanguageModel)
        and trainer.enable_validation
        and getattr(datamodule, "bytes_per_token", None)
    ):
        return [metric_tag(VAL, BITS_PER_BYTE)]
    return []


def learning_rate_tags(trainer: pl.Trainer) -> list[str]:
    """The names every ``LearningRateMonitor`` gave the parameter groups in its ``on_train_start``."""
    return [
        name for callback in trainer.callbacks if isinstance(callback, LearningRateMonitor) for name in callback.lrs
    ]


def tokens_per_second_tags(trainer: pl.Trainer) -> list[str]:
    """Training tokens per second of each ``ThroughputMonitor`` that counts tokens and fills its window.

    Lightning's ``Throughput`` itself names them (``train/device/items_per_sec``, plus
    ``train/items_per_sec`` over all ranks when there are several): a throw-away one with the
    monitor's settings is fed two steps. Rates exist only after ``window_size`` batches of this fit,
    so a fit (or the rest of a resumed one) shorter than that logs none and gets none here.
    """
    default_window = inspect.signature(Throughput).parameters["window_size"].default
    tags = []
    for callback in trainer.callbacks:
        if not isinstance(callback, ThroughputMonitor) or callback.length_fn is None:
            continue
        window = callback.kwargs.get("window_size", default_window)
        remaining_steps = trainer.max_steps - trainer.global_step
        if trainer.max_steps != -1 and remaining_steps * trainer.accumulate_grad_batches < window:
            continue
        probe = Throughput(**{**callback.kwargs, "window_size": 2}, world_size=trainer.world_size)
        for count in (1, 2):
            probe.update(time=float(count), batches=count, samples=count, lengths=count)
        tags += [
            f"{RunningStage.TRAINING.value}{probe.separator}{key}"
            for key in probe.compute()
            if key.endswith(TOKENS_PER_SECOND)
        ]
    return tags


def usage_layers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
    """Paths of the Memory Layers an enabled ``BucketUsageMonitor`` logs (none without one)."""
    monitored = any(isinstance(c, BucketUsageMonitor) and c.enabled for c in trainer.callbacks)
    return list(memory_layers(pl_module)) if monitored else []


def coverage_layers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
    """Paths of the Memory Layers an enabled ``GradientCoverageMonitor`` logs (none without one)."""
    monitored = any(isinstance(c, GradientCoverageMonitor) and c.enabled for c in trainer.callbacks)
    return list(memory_layers(pl_module)) if monitored else []
