"""``BucketUsageMonitor``: how evenly training tokens spread over the rows of every Memory Layer table."""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.hooks import RemovableHandle

from mf_lightning.callbacks.heatmap import rank_frequency_plot, usage_heatmap
from mf_lightning.callbacks.monitoring import (
    block_and_kind,
    check_every_n_steps,
    group_layers,
    log_scalars,
    memory_layers,
    memory_tag,
    tensorboard_writers,
)
from mf_lightning.callbacks.usage_metrics import USAGE_METRICS, usage_metrics


def model_usage_tag(metric: str) -> str:
    """Tag of a usage metric averaged over every table of the model, e.g. ``memory_usage/used_fraction``."""
    return memory_tag("usage", metric)


def layer_usage_tag(metric: str, layer: str) -> str:
    """Tag of a usage metric averaged over the tables of one layer, e.g. ``memory_used_fraction/blocks.0.qkv``."""
    return memory_tag(metric, layer)


def per_table_usage_tag(metric: str, layer: str) -> str:
    """Tag of the histogram of a usage metric over the tables of one layer, e.g. ``memory_gini_per_table/...``."""
    return memory_tag(f"{metric}_per_table", layer)


def bucket_counts_tag(layer: str) -> str:
    """Tag of the histogram of tokens per bucket of one layer."""
    return memory_tag("bucket_counts", layer)


def heatmap_tag(layer: str) -> str:
    """Tag of a layer's usage heatmap image."""
    return memory_tag("heatmap", layer)


def rank_frequency_tag(kind: str) -> str:
    """Tag of the rank-frequency plot of every layer of one kind (``qkv``, ``ffn_in``, ...)."""
    return memory_tag("rank_frequency", kind)


class BucketUsageMonitor(pl.Callback):
    """Counts the bucket each training token picks in each table and logs usage statistics per window.

    Bucket observers (:meth:`MemoryLayer.observe_buckets`, which reuse the forward's own hash) on every
    ``MemoryLayer`` of the LightningModule add the buckets of each training batch
    (validation and prediction are not counted) into int64 counts ``[num_tables, 2**code_bits]`` per
    layer, kept on the model's device in one flat buffer so counting needs no host sync and the ranks
    need one collective. Every ``log_every_n_steps`` optimizer steps the window's counts are summed over
    ranks (on every rank), rank 0 logs, and the counts restart from zero. Logged, at the global step:

    - ``memory_usage/<metric>``: each metric of ``USAGE_METRICS`` averaged over every table of the model;
    - ``memory_<metric>/<layer path>``: the metric averaged over that layer's tables;
    - TensorBoard only: histograms ``memory_<metric>_per_table/<layer path>`` (one value per table) and
      ``memory_bucket_counts/<layer path>`` (tokens per bucket), and every ``image_every_n_steps`` the pictures
      of ``mf_lightning.callbacks.heatmap``: a heatmap ``memory_heatmap/<layer path>`` (a band per
      table, rows sorted by use, coloured by share of tokens against uniform use, with a colour bar) and
      a rank-frequency plot ``memory_rank_frequency/<kind>`` per layer kind (``qkv``, ``ffn_in``, ...:
      the layer's name in its block), one line per block.

    The ``*_tag`` functions of this module name every tag; the TensorBoard layout uses them too.

    ``counts`` maps each layer path to the current window's counts (views into the flat buffer).
    ``enabled=False`` switches the monitor off (it is always present in ``mf fit``).
    """

    def __init__(self, log_every_n_steps: int = 50, image_every_n_steps: int = 500, enabled: bool = True) -> None:
        self.enabled = enabled
        self.log_every_n_steps = check_every_n_steps("log_every_n_steps", log_every_n_steps)
        self.image_every_n_steps = check_every_n_steps("image_every_n_steps", image_every_n_steps)
        if image_every_n_steps % log_every_n_steps:
            raise ValueError(
                f"image_every_n_steps={image_every_n_steps} must be a multiple of log_every_n_steps="
                f"{log_every_n_steps}: heatmaps show the counts of a logging window (try "
                f"{image_every_n_steps + log_every_n_steps - image_every_n_steps % log_every_n_steps})"
            )
        self.counts: dict[str, torch.Tensor] = {}
        self._flat_counts: torch.Tensor | None = None
        self._hooks: list[RemovableHandle] = []
        self._collecting = False
        self._last_logged_step = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self.counts, self._flat_counts = {}, None
        layers = memory_layers(pl_module) if self.enabled else {}
        if not layers:
            if self.enabled:
                rank_zero_info("BucketUsageMonitor: the model has no MemoryLayer, so there is nothing to monitor")
            return
        sizes = [layer.num_tables * 2**layer.code_bits for layer in layers.values()]
        self._flat_counts = torch.zeros(sum(sizes), dtype=torch.int64, device=pl_module.device)
        start = 0
        for (name, layer), size in zip(layers.items(), sizes):
            self.counts[name] = self._flat_counts[start : start + size].view(layer.num_tables, -1)
            offsets = start + torch.arange(layer.num_tables, device=pl_module.device) * 2**layer.code_bits
            self._hooks.append(layer.observe_buckets(functools.partial(self._count_buckets, offsets)))
            start += size
        self._last_logged_step = trainer.global_step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._collecting = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._collecting = False
        step = trainer.global_step
        if self._flat_counts is None or step % self.log_every_n_steps or step == self._last_logged_step:
            return
        self._last_logged_step = step
        total = trainer.strategy.reduce(self._flat_counts, reduce_op="sum")
        if trainer.is_global_zero:
            self._log_window(trainer, total.cpu(), step)
        self._flat_counts.zero_()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _count_buckets(self, offsets: torch.Tensor, buckets: torch.Tensor) -> None:
        """Bucket observer: add the bucket of every token and table at ``offsets + bucket`` of the flat counts."""
        if not self._collecting:
            return
        flat = (buckets.reshape(-1, offsets.numel()) + offsets).reshape(-1)
        ones = torch.ones((), dtype=torch.int64, device=flat.device).expand(flat.numel())
        self._flat_counts.scatter_add_(0, flat, ones)

    def _log_window(self, trainer: pl.Trainer, flat_counts: torch.Tensor, step: int) -> None:
        """Rank 0: write the scalars, histograms and (when due) heatmaps of one window's counts."""
        counts, start = {}, 0
        for name, view in self.counts.items():
            counts[name] = flat_counts[start : start + view.numel()].view_as(view)
            start += view.numel()
        per_table = {name: usage_metrics(layer_counts) for name, layer_counts in counts.items()}
        scalars = {
            model_usage_tag(metric): torch.cat([values[metric] for values in per_table.values()]).mean().item()
            for metric in USAGE_METRICS
        }
        for name, values in per_table.items():
            scalars.update({layer_usage_tag(metric, name): value.mean().item() for metric, value in values.items()})
        log_scalars(trainer, scalars, step)
        writers = tensorboard_writers(trainer)
        for writer in writers:
            for name, layer_counts in counts.items():
                for metric, value in per_table[name].items():
                    writer.add_histogram(per_table_usage_tag(metric, name), value, step)
                writer.add_histogram(bucket_counts_tag(name), layer_counts.flatten().float(), step)
        if writers and step % self.image_every_n_steps == 0:
            pictures = usage_pictures(counts, step)
            for writer in writers:
                for tag, picture in pictures.items():
                    writer.add_image(tag, picture, step, dataformats="HWC")

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._collecting = False


def usage_pictures(counts: dict[str, torch.Tensor], step: int) -> dict[str, np.ndarray]:
    """Tag -> RGB image: a heatmap per layer and a rank-frequency plot per layer kind, one line per block."""
    pictures = {heatmap_tag(name): usage_heatmap(layer_counts, name, step) for name, layer_counts in counts.items()}
    for kind, names in group_layers(counts, by="kind").items():
        curves = {block_and_kind(name)[0]: counts[name] for name in names}
        pictures[rank_frequency_tag(kind)] = rank_frequency_plot(curves, kind, step)
    return pictures
