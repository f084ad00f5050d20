"""A callback the DDP test injects with ``--trainer.callbacks+=ddp_probe.SaveRankWeights``: every rank saves
its final weights and the gradients its optimizer stepped with, so the test can check that the ranks stayed
identical and compare runs on different numbers of processes."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class SaveRankWeights(L.Callback):
    """Writes ``rank<N>.pt`` (the model's state dict) and ``gradients<N>.pt`` into ``folder`` when training ends.

    ``gradients<N>.pt`` holds, by parameter name, ``first``: the gradients of the first optimizer step (after
    DDP's all-reduce, before clipping), and ``below_eps``: where a gradient was non-zero but smaller than
    Adam's ``eps`` at some step. Such a gradient is rounding noise of a sum that cancels (e.g. a bias every
    softmax input shares), and Adam turns its sign into a step of up to a few per cent of the learning rate.
    """

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.first: dict[str, torch.Tensor] = {}
        self.below_eps: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        eps = {id(parameter): group["eps"] for group in optimizer.param_groups for parameter in group["params"]}
        for name, parameter in pl_module.named_parameters():
            if parameter.grad is None:
                continue
            gradient = parameter.grad.detach()
            self.first.setdefault(name, gradient.clone())
            noise = (gradient != 0) & (gradient.abs() < eps[id(parameter)])
            self.below_eps[name] = self.below_eps.get(name, torch.zeros_like(noise)) | noise

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        torch.save(pl_module.state_dict(), self.folder / f"rank{rank}.pt")
        torch.save({"first": self.first, "below_eps": self.below_eps}, self.folder / f"gradients{rank}.pt")
