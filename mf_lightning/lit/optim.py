"""Parameter groups and the learning-rate schedule of SPEC §2 (paper and authors' tiny config)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from mf_lightning.nn.memory_layer import MemoryLayer


def parameter_groups(model: nn.Module, weight_decay: float, table_weight_decay: float | None = None) -> list[dict]:
    """Three groups: Memory Layer tables, other matrices (decayed), biases and norms (never decayed).

    Tables get their own group so their learning rate and weight decay can differ (sparse updates);
    every group is returned even when empty, so group indices are stable for schedulers and logs.
    """
    table_ids = {id(m.tables) for m in model.modules() if isinstance(m, MemoryLayer)}
    tables, decayed, plain = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in table_ids:
            tables.append(param)
        elif param.ndim >= 2:
            decayed.append(param)
        else:
            plain.append(param)
    return [
        {
            "name": "tables",
            "params": tables,
            "weight_decay": weight_decay if table_weight_decay is None else table_weight_decay,
        },
        {"name": "decay", "params": decayed, "weight_decay": weight_decay},
        {"name": "no_decay", "params": plain, "weight_decay": 0.0},
    ]


def check_fraction(name: str, value: float, upper_inclusive: bool = True) -> float:
    """Validate a value in [0, 1] (or [0, 1)) and return it; the error names the argument."""
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


class WarmupCosineLR(LRScheduler):
    """Linear warm-up over ``warmup_fraction`` of the run, then cosine decay to ``min_lr_ratio`` of peak.

    ``total_steps`` may be left ``None`` at construction and set with :meth:`set_total_steps` before the
    first step (the LightningModule fills it with ``trainer.estimated_stepping_batches``). The schedule's
    shape (``SHAPE``, and ``base_lrs``, the peaks) is configuration: ``configure_resumed`` puts the
    configured values back after a checkpoint restored its own; its position (``last_epoch``) is state.
    """

    SHAPE = ("total_steps", "warmup_fraction", "min_lr_ratio")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int | None = None,
        warmup_fraction: float = 0.01,
        min_lr_ratio: float = 0.01,
        last_epoch: int = -1,
    ) -> None:
        self.total_steps = total_steps
        self.warmup_fraction = check_fraction("warmup_fraction", warmup_fraction, upper_inclusive=False)
        self.min_lr_ratio = check_fraction("min_lr_ratio", min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate at optimizer step ``step``."""
        total = max(1, self.total_steps or 1)
        warmup = max(1, round(self.warmup_fraction * total)) if self.warmup_fraction > 0 else 0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run length and re-apply the current step's learning rate to every group."""
        self.total_steps = total_steps
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = self.get_lr()

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}


def scale_group_lr(optimizer: torch.optim.Optimizer, name: str, multiplier: float) -> None:
    """Multiply the learning rate of the named parameter group (before a scheduler records it)."""
    for group in optimizer.param_groups:
        if group.get("name") == name:
            group["lr"] *= multiplier


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's hyper-parameters (everything but its parameters), ``lr`` being the peak.

    Taken right after the optimizer is built from the config, before a scheduler or checkpoint changes them.
    """
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def configure_resumed(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    groups: list[dict[str, Any]],
    shape: dict[str, Any] | None = None,
) -> list[str]:
    """Puts the configured hyper-parameters back after a checkpoint restored the optimizer and scheduler.

    The config wins for every group setting (weight decay, betas, ...) and for the peak learning rate,
    which scales the current one (so a schedule continues at the same point of its new curve), and for
    a ``WarmupCosineLR``'s ``shape`` (``total_steps`` included); the optimizer's moments and the step
    count stay as restored. Returns ``"name old -> new"`` for each change (nothing on a fresh run).
    """
    changes = []
    base_lrs = getattr(scheduler, "base_lrs", None)
    for index, (group, configured) in enumerate(zip(optimizer.param_groups, groups)):
        label = group.get("name", f"group {index}")
        for key, value in configured.items():
            if key == "lr":
                peak = base_lrs[index] if base_lrs is not None else group.get("initial_lr", group["lr"])
                if peak != value:
                    changes.append(f"{label} peak lr {peak:g} -> {value:g}")
                    group["lr"] *= value / peak
                    group["initial_lr"] = value
                    if base_lrs is not None:
                        base_lrs[index] = value
            elif key != "initial_lr" and group.get(key) != value:
                changes.append(f"{label} {key} {group.get(key)} -> {value}")
                group[key] = value
    if isinstance(scheduler, WarmupCosineLR) and shape is not None:
        for key, value in shape.items():
            old = getattr(scheduler, key)
            if old != value:
                if old is not None:
                    changes.append(f"schedule {key} {old} -> {value}")
                setattr(scheduler, key, value)
        scheduler.set_total_steps(scheduler.total_steps)
    return changes
