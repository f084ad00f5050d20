"""``GradientCoverageMonitor``: how many table rows a step trains, and how strong table gradients are."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.optim import Optimizer

from mf_lightning.callbacks.monitoring import check_every_n_steps, log_scalars, memory_layers
from mf_lightning.nn import MemoryLayer


class GradientCoverageMonitor(pl.Callback):
    """Logs, every ``log_every_n_steps`` optimizer steps (step 0 included), the gradient of the tables.

    A Memory Layer table row gets a gradient only when some token of the batch hashed to it, so each
    step trains a fraction of the rows; this shows that fraction and whether the tables learn at a
    pace comparable to the rest of the model. Measured in ``on_before_optimizer_step``, when gradients
    are final (accumulated, unscaled and, under DDP, already all-reduced, hence the same on every
    rank: rank 0 logs, no collective is needed). Logged, at the global step of the update:

    - ``grad_coverage/<layer path>``: fraction of the layer's rows (one ``[out_features]`` vector of one
      table) with a non-zero gradient;
    - ``grad_summary/table_row_coverage``: the same over every table row of the model;
    - ``grad_summary/table_norm`` and ``grad_summary/other_norm``: L2 norm of the gradients of all
      tables, and of all other parameters.

    ``enabled=False`` switches the monitor off (it is always present in ``mf fit``).
    """

    def __init__(self, log_every_n_steps: int = 50, enabled: bool = True) -> None:
        self.enabled = enabled
        self.log_every_n_steps = check_every_n_steps("log_every_n_steps", log_every_n_steps)
        self._layers: dict[str, MemoryLayer] = {}
        self._last_logged_step = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = memory_layers(pl_module) if self.enabled else {}
        self._last_logged_step = -1
        if not self._layers and self.enabled:
            rank_zero_info("GradientCoverageMonitor: the model has no MemoryLayer, so there is nothing to monitor")

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        step = trainer.global_step
        if not self._layers or step % self.log_every_n_steps or step == self._last_logged_step:
            return
        self._last_logged_step = step
        if trainer.is_global_zero:
            log_scalars(trainer, gradient_statistics(pl_module, self._layers), step)


def gradient_statistics(module: nn.Module, layers: Mapping[str, MemoryLayer]) -> dict[str, float]:
    """Row coverage per layer and overall, and table versus other gradient norms (see the monitor)."""
    rows_hit = torch.stack([rows_with_gradient(layer) for layer in layers.values()])
    rows = torch.tensor([layer.num_tables * 2**layer.code_bits for layer in layers.values()])
    statistics = {f"grad_coverage/{name}": value for name, value in zip(layers, (rows_hit / rows).tolist())}
    statistics["grad_summary/table_row_coverage"] = (rows_hit.sum() / rows.sum()).item()
    table_ids = {id(layer.tables) for layer in layers.values()}
    tables = [layer.tables for layer in layers.values()]
    others = [p for p in module.parameters() if id(p) not in table_ids]
    statistics["grad_summary/table_norm"] = gradient_norm(tables)
    statistics["grad_summary/other_norm"] = gradient_norm(others)
    return statistics


def rows_with_gradient(layer: MemoryLayer) -> torch.Tensor:
    """Number of table rows with a non-zero gradient, on the CPU (0 when the tables have no gradient)."""
    if layer.tables.grad is None:
        return torch.zeros((), dtype=torch.int64)
    return (layer.tables.grad != 0).any(-1).sum().cpu()


def gradient_norm(parameters: list[nn.Parameter]) -> float:
    """L2 norm of the gradients of ``parameters`` taken together, in float32 (0 when none has one)."""
    norms = [p.grad.detach().float().norm().cpu() for p in parameters if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0
