"""``GradientCoverageMonitor``: how many table rows a step trains, and how strong table gradients are."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from mf_lightning.callbacks.monitoring import check_every_n_steps, log_scalars, memory_layers, memory_tag
from mf_lightning.nn import MemoryLayer

TABLE_ROW_COVERAGE = memory_tag("grad_summary", "table_row_coverage")
TABLE_NORM = memory_tag("grad_summary", "table_norm")
OTHER_NORM = memory_tag("grad_summary", "other_norm")


def coverage_tag(layer: str) -> str:
    """Tag of the fraction of one layer's table rows with a gradient, e.g. ``memory_grad_coverage/blocks.0.qkv``."""
    return memory_tag("grad_coverage", layer)


class GradientCoverageMonitor(pl.Callback):
    """Logs, every ``log_every_n_steps`` optimizer steps (step 0 included), the gradient of the tables.

    A Memory Layer table row gets a gradient only when some token of the batch hashed to it, so each
    step trains a fraction of the rows; this shows that fraction and whether the tables learn at a
    pace comparable to the rest of the model. Measured in ``on_before_optimizer_step``, when gradients
    are final (accumulated, unscaled and, under DDP, already all-reduced, hence the same on every
    rank: rank 0 logs, no collective is needed; under FSDP every rank measures its shards and the sums
    are reduced). Logged, at the global step of the update:

    - ``memory_grad_coverage/<layer path>``: fraction of the layer's rows (one ``[out_features]`` vector of one
      table) with a non-zero gradient;
    - ``memory_grad_summary/table_row_coverage``: the same over every table row of the model;
    - ``memory_grad_summary/table_norm`` and ``memory_grad_summary/other_norm``: L2 norm of the gradients of all
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
        sharded = is_sharded(self._layers)
        if sharded or trainer.is_global_zero:
            statistics = gradient_statistics(pl_module, self._layers, trainer.strategy.reduce if sharded else None)
            if trainer.is_global_zero:
                log_scalars(trainer, statistics, step)


def is_sharded(layers: Mapping[str, MemoryLayer]) -> bool:
    """Whether the tables are FSDP ``DTensor`` shards, so each rank holds a part of every gradient."""
    return any(isinstance(layer.tables, DTensor) for layer in layers.values())


def gradient_statistics(
    module: nn.Module, layers: Mapping[str, MemoryLayer], sum_over_ranks: Callable[..., torch.Tensor] | None = None
) -> dict[str, float]:
    """Row coverage per layer and overall, and table versus other gradient norms (see the monitor).

    Under FSDP every parameter is a ``DTensor`` sharded along its first dimension (for tables, whole
    rows stay on one rank), so each rank measures its local shards and ``sum_over_ranks`` (e.g.
    ``strategy.reduce`` with ``reduce_op="sum"``, called on every rank) adds the row counts and squared
    norms up: the same numbers as from full gradients.
    """
    table_ids = {id(layer.tables) for layer in layers.values()}
    tables = [layer.tables for layer in layers.values()]
    others = [p for p in module.parameters() if id(p) not in table_ids]
    sums = torch.stack([*(rows_with_gradient(table) for table in tables), squared_norm(tables), squared_norm(others)])
    if sum_over_ranks is not None:
        sums = sum_over_ranks(sums, reduce_op="sum")
    sums = sums.cpu()
    rows_hit = sums[: len(tables)]
    rows = torch.tensor([layer.num_tables * 2**layer.code_bits for layer in layers.values()], dtype=sums.dtype)
    statistics = {coverage_tag(name): value for name, value in zip(layers, (rows_hit / rows).tolist())}
    statistics[TABLE_ROW_COVERAGE] = (rows_hit.sum() / rows.sum()).item()
    statistics[TABLE_NORM] = sums[-2].sqrt().item()
    statistics[OTHER_NORM] = sums[-1].sqrt().item()
    return statistics


def local_gradient(parameter: nn.Parameter) -> torch.Tensor | None:
    """The gradient of ``parameter``, or this rank's shard of it under FSDP (None when it has none)."""
    grad = parameter.grad
    return grad.to_local() if isinstance(grad, DTensor) else grad


def rows_with_gradient(tables: nn.Parameter) -> torch.Tensor:
    """Number of table rows with a non-zero gradient, as a float64 scalar (0 when the tables have no gradient)."""
    grad = local_gradient(tables)
    if grad is None:
        return torch.zeros((), dtype=torch.float64, device=tables.device)
    return (grad != 0).any(-1).sum().double()


def squared_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    """Sum of the squared gradients of ``parameters`` as a float64 scalar (0 when none has one)."""
    grads = [grad for grad in map(local_gradient, parameters) if grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=parameters[0].device if parameters else "cpu")
    return torch.stack([grad.detach().float().pow(2).sum() for grad in grads]).double().sum()
