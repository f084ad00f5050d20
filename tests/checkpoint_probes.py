"""Callbacks that checkpoint tests inject into ``mf fit`` (also in subprocesses and under DDP) with
``--trainer.callbacks+``: a scripted validation score, so a test decides which validations improve, and a
record of the step ``last.ckpt`` holds after each validation."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch


class ScriptedScore(pl.Callback):
    """Logs ``probe/score`` = ``scores[i]`` at the i-th validation of the fit (the same on every rank)."""

    def __init__(self, scores: list[float]) -> None:
        self.scores, self.validations = scores, 0

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            pl_module.log("probe/score", self.scores[self.validations], sync_dist=True)
            self.validations += 1


class LastAfterValidation(pl.Callback):
    """Writes ``[[step validated, step held by last.ckpt right after], ...]`` to ``out`` (JSON, rank 0), once
    the checkpoint callback has run: at the next batch or at the end of training."""

    def __init__(self, last: str, out: str) -> None:
        self.last, self.out, self.pairs, self.validated = Path(last), Path(out), [], None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated = trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        self.record(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record(trainer)

    def record(self, trainer: pl.Trainer) -> None:
        if self.validated is not None and trainer.is_global_zero:
            self.pairs.append([self.validated, torch.load(self.last, weights_only=True)["global_step"]])
            self.out.write_text(json.dumps(self.pairs))
        self.validated = None
