"""Writes ``mf predict`` completions to a JSONL file and the console as they are produced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class CompletionWriter(BasePredictionWriter):
    """Appends one ``{"prompt", "completion"}`` JSON line per prompt to ``output_path``.

    ``output_path`` defaults to ``predictions.jsonl`` in the trainer's log directory. Each rank writes
    its own file (suffix ``.rankN``) under DDP so no two processes write the same file.
    """

    def __init__(self, output_path: str | None = None, echo: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self.echo = echo
        self.path: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.output_path or Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl")
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        self.path = path

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(prediction, ensure_ascii=False) + "\n")
        if self.echo:
            rank_zero_info(f"\n>>> {prediction['prompt']}{prediction['completion']}")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(f"Completions written to {self.path}")
