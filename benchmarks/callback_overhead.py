"""Cost of ``BucketUsageMonitor`` on a training step of a small MemoryFormer (target: under 5%).

Trains a MemoryFormer in a real Lightning Trainer with the monitor's hooks attached, counting buckets
on every other step only, so steps with and without counting alternate in one run and slow drifts of
a shared machine hit both alike. A step is the wall time between consecutive training-batch starts
(forward, backward, optimizer step and callbacks). The monitor logs every ``--log-every`` steps (its
default, 50; keep it even so it lands on a counting step) and draws heatmaps 10x less often, so the cost
of reducing and logging a window is included.
Overhead is reported from mean step times and, robust to outliers, from the median of the ratios of
neighbouring steps. Prints a markdown table and writes it to
``benchmarks/results/callback_overhead_<device>.md``.

    python benchmarks/callback_overhead.py [--steps 40] [--device cpu] [--log-every 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import torch
from harness import device_slug, environment, write_result
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from mf_lightning.callbacks import BucketUsageMonitor
from mf_lightning.config import ModelConfig
from mf_lightning.models import MemoryFormer

WARMUP_STEPS = 6
MODELS = {
    "debug (2 x 64, K=8)": {"preset": "debug", "batch": 8, "seq": 128},
    "debug wide (2 x 256, K=32)": {"preset": "debug", "batch": 4, "seq": 128, "n_embd": 256, "n_head": 4},
}


class NextTokenTask(pl.LightningModule):
    """Next-token loss of a MemoryFormer, trained with AdamW."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.model = MemoryFormer(config)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        return self.model(tokens[:, :-1], tokens[:, 1:])[1]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class EveryOtherStepMonitor(BucketUsageMonitor):
    """The monitor, counting only on odd training batches (its hooks stay attached and return at once)."""

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % 2:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


class StepTimer(pl.Callback):
    """Wall time between consecutive training-batch starts: one whole step, callbacks included."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.starts: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.starts.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Duration of every step after warm-up, starting with an even (not counting) one."""
        return [b - a for a, b in zip(self.starts, self.starts[1:])][WARMUP_STEPS:]


def time_steps(
    setup: dict[str, Any], steps: int, device: torch.device, log_dir: str, log_every: int
) -> tuple[list[float], list[float]]:
    """Seconds of the plain (even) and counting (odd) steps of one run, in pairs."""
    torch.manual_seed(0)
    overrides = {k: v for k, v in setup.items() if k not in ("preset", "batch", "seq")}
    config = ModelConfig.from_preset(setup["preset"], max_seq_len=setup["seq"], **overrides)
    total_steps = WARMUP_STEPS + 2 * steps + 1
    tokens = torch.randint(config.vocab_size, (setup["batch"] * total_steps, setup["seq"] + 1))
    timer = StepTimer(device)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        max_steps=total_steps,
        logger=TensorBoardLogger(log_dir),
        callbacks=[timer, EveryOtherStepMonitor(log_every_n_steps=log_every, image_every_n_steps=10 * log_every)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(NextTokenTask(config), DataLoader(TensorDataset(tokens), batch_size=setup["batch"]))
    seconds = timer.step_seconds()[: 2 * steps]
    return seconds[0::2], seconds[1::2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each kind per model")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--log-every", type=int, default=50, help="monitor log interval (heatmaps every 10x)")
    args = parser.parse_args()
    if args.steps < 1 or args.log_every < 1:
        parser.error(f"--steps and --log-every must be positive integers, got {args.steps} and {args.log_every}")
    device = torch.device(args.device)
    before = environment(device)
    rows = []
    with tempfile.TemporaryDirectory() as log_dir:
        for name, setup in MODELS.items():
            plain, counting = time_steps(setup, args.steps, device, log_dir, args.log_every)
            mean_plain, mean_counting = statistics.fmean(plain), statistics.fmean(counting)
            paired = statistics.median(c / p for p, c in zip(plain, counting))
            rows.append(
                f"| {name} | {setup['batch'] * setup['seq']} | {mean_plain * 1e3:.1f} | {mean_counting * 1e3:.1f} "
                f"| {100 * (mean_counting / mean_plain - 1):+.1f}% | {100 * (paired - 1):+.1f}% |"
            )
            print(rows[-1], flush=True)

    report = "\n".join(
        [
            "# BucketUsageMonitor overhead per training step",
            "",
            f"Before: {before}. After: load average {os.getloadavg()[0]:.1f} (other work on the machine adds noise to "
            f"every figure). Command: `python benchmarks/callback_overhead.py --steps {args.steps} "
            f"--device {args.device} --log-every {args.log_every}`.",
            f"{args.steps} steps without and {args.steps} with bucket counting, alternating in one run after "
            f"{WARMUP_STEPS} warm-up steps; the monitor logs every {args.log_every} steps and draws heatmaps every {10 * args.log_every}.",
            "",
            "| model | tokens / step | plain step (ms, mean) | counting step (ms, mean) | overhead (means) "
            "| overhead (median of paired ratios) |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    write_result(f"callback_overhead_{device_slug(device)}.md", report)


if __name__ == "__main__":
    main()
