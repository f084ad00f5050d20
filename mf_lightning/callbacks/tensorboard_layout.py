"""``OverviewLayout``: the charts a researcher opens first, as TensorBoard's Custom Scalars layout.

TensorBoard's Time Series tab lists every tag alphabetically (the bucket histograms first); the
Custom Scalars tab (``http://localhost:6006/#custom_scalars``) shows the charts of a layout instead,
several tags per chart on shared axes. This callback writes, at the first training batch of every fit
(once every callback's ``on_train_start`` has named its tags):

- **Overview**: loss (train, validation, balance), validation bits per byte, learning rate of each
  parameter group, training tokens per second, used fraction of all table rows and gradient row coverage;
- **Memory Layers by block**: per block, the used fraction of each of its Memory Layers;
- **Memory Layers by kind**: per kind (``qkv``, ``ffn_in``, ``ffn_out``), the used fraction and the
  gradient coverage of that layer in every block.

Every line is one exact tag (an anchored, escaped regular expression), taken from the code that logs it
(``mf_lightning.callbacks.run_tags``); charts whose tags the run does not log are left out.
"""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl

from mf_lightning.callbacks.bucket_usage import layer_usage_tag, model_usage_tag
from mf_lightning.callbacks.gradient_coverage import TABLE_ROW_COVERAGE, coverage_tag
from mf_lightning.callbacks.monitoring import group_layers, tensorboard_writers
from mf_lightning.callbacks.run_tags import (
    bits_per_byte_tags,
    coverage_layers,
    learning_rate_tags,
    loss_tags,
    tokens_per_second_tags,
    usage_layers,
)
from mf_lightning.callbacks.usage_metrics import USED_FRACTION

Charts = dict[str, dict[str, list[str]]]
"""Category -> chart title -> the tags drawn in that chart, in display order."""


class OverviewLayout(pl.Callback):
    """Writes the Custom Scalars layout of ``overview_charts`` to every TensorBoard logger, once per fit (rank 0).

    A run with nothing to chart (no metric this layout knows) gets no layout.
    """

    def __init__(self) -> None:
        self._written = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._written = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._written:
            return
        self._written = True
        writers = tensorboard_writers(trainer) if trainer.is_global_zero else []
        charts = overview_charts(trainer, pl_module) if writers else {}
        if charts:
            layout = custom_scalars_layout(charts)
            for writer in writers:
                writer.add_custom_scalars(layout)


def overview_charts(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Charts:
    """The charts described in the module docstring, with the tags this fit logs."""
    usage, coverage = usage_layers(trainer, pl_module), coverage_layers(trainer, pl_module)
    overview = {
        "loss": loss_tags(trainer, pl_module),
        "validation bits per byte": bits_per_byte_tags(trainer, pl_module),
        "learning rate": learning_rate_tags(trainer),
        "training tokens per second": tokens_per_second_tags(trainer),
        "used fraction of all table rows": [model_usage_tag(USED_FRACTION)] if usage else [],
        "table rows with a gradient, all tables": [TABLE_ROW_COVERAGE] if coverage else [],
    }
    by_block = {
        f"{block}: used fraction": [layer_usage_tag(USED_FRACTION, path) for path in paths]
        for block, paths in group_layers(usage, by="block").items()
    }
    usage_by_kind, coverage_by_kind = group_layers(usage, by="kind"), group_layers(coverage, by="kind")
    by_kind = {}
    for kind in {**usage_by_kind, **coverage_by_kind}:
        by_kind[f"{kind}: used fraction"] = [
            layer_usage_tag(USED_FRACTION, path) for path in usage_by_kind.get(kind, [])
        ]
        by_kind[f"{kind}: rows with a gradient"] = [coverage_tag(path) for path in coverage_by_kind.get(kind, [])]
    charts = {"Overview": overview, "Memory Layers by block": by_block, "Memory Layers by kind": by_kind}
    charts = {category: {title: tags for title, tags in group.items() if tags} for category, group in charts.items()}
    return {category: group for category, group in charts.items() if group}


def exact_tag(tag: str) -> str:
    """A regular expression matching ``tag`` and nothing else (layouts select tags by regular expression)."""
    return f"^{re.escape(tag)}$"


def custom_scalars_layout(charts: Charts) -> dict[str, dict[str, list[Any]]]:
    """``charts`` as ``SummaryWriter.add_custom_scalars`` takes them: every chart a Multiline of exact tags."""
    return {
        category: {title: ["Multiline", [exact_tag(tag) for tag in tags]] for title, tags in group.items()}
        for category, group in charts.items()
    }
