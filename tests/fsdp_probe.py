"""A callback the FSDP test injects with ``--trainer.callbacks+=fsdp_probe.ShardReport``: every rank writes
what it holds (local shards of parameters and optimizer state against their full sizes) and whether a
Memory Layer ever saw sharded tables inside its forward; rank 0 also saves the first step's full gradients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from mf_lightning.nn import MemoryLayer


def local_numel(tensor: torch.Tensor) -> int:
    """Values of ``tensor`` held by this rank: its local shard's for a ``DTensor``."""
    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()


class ShardReport(L.Callback):
    """Writes ``rank<N>.json`` into ``folder`` when training ends."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.forward_saw_dtensor: list[bool] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for layer in pl_module.modules():
            if isinstance(layer, MemoryLayer):
                layer.register_forward_pre_hook(
                    lambda module, args: self.forward_saw_dtensor.append(isinstance(module.tables, DTensor))
                )

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        """At the first step, ``first_gradients.pt``: every parameter's whole gradient (reduced over the ranks)."""
        if trainer.global_step != 0:
            return
        gradients = {
            name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
            for name, p in pl_module.named_parameters()
        }
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(gradients, self.folder / "first_gradients.pt")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for module in pl_module.modules():  # the root unit stays gathered after an evaluation forward
            if isinstance(module, FSDPModule):
                module.reshard()
        parameters = list(pl_module.parameters())
        states = [
            value
            for state in trainer.optimizers[0].state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor) and value.dim() > 0
        ]
        report = {
            "parameters": sum(p.numel() for p in parameters),
            "local_parameters": sum(local_numel(p) for p in parameters),
            "optimizer_state": sum(s.numel() for s in states),
            "local_optimizer_state": sum(local_numel(s) for s in states),
            "forwards": len(self.forward_saw_dtensor),
            "forwards_with_dtensor_tables": sum(self.forward_saw_dtensor),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
