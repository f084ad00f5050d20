"""A callback the DDP test injects with ``--trainer.callbacks+=ddp_probe.SaveRankWeights``: every rank saves
its final weights, so the test can check the ranks stayed identical."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class SaveRankWeights(L.Callback):
    """Writes ``rank<N>.pt`` (the model's state dict) into ``folder`` when training ends."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(pl_module.state_dict(), self.folder / f"rank{trainer.global_rank}.pt")
