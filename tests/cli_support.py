"""Shared helpers for tests that drive the ``mf`` CLI in-process on a tiny generated corpus."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mf_lightning.cli import main
from mf_lightning.lit.checkpoints import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
WORDS = [
    "the",
    "memory",
    "layer",
    "hashes",
    "tokens",
    "into",
    "buckets",
    "of",
    "learned",
    "tables",
    "while",
    "attention",
    "mixes",
    "them",
]


def write_corpus(folder: Path, documents: int = 24, words: int = 80) -> Path:
    """A folder of small plain-text documents of random sentences."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for index in range(documents):
        text = " ".join(rng.choice(WORDS) for _ in range(words)) + ".\n"
        (folder / f"doc{index:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def tiny_run_args(root: Path, corpus: Path, max_steps: int = 6, **overrides: object) -> list[str]:
    """Quickstart config shrunk to seconds: tiny windows and batches, frequent validation, no rich bar."""
    settings = {
        "trainer.default_root_dir": root,
        "trainer.max_steps": max_steps,
        "validation.every_n_steps": 3,
        "trainer.limit_val_batches": 2,
        "trainer.log_every_n_steps": 1,
        "trainer.enable_progress_bar": False,
        "data.source": corpus,
        "data.cache_dir": root / "cache",
        "data.seq_len": 32,
        "data.batch_size": 4,
        "data.val_fraction": 0.2,
        "data.val_windows": 8,
        "model.overrides": "{max_seq_len: 64}",
        "bucket_usage.log_every_n_steps": 2,
        "bucket_usage.image_every_n_steps": 2,
        "gradient_coverage.log_every_n_steps": 2,
        **overrides,
    }
    args = ["--config", str(QUICKSTART)]
    for key, value in settings.items():
        args += [f"--{key}", str(value)]
    return args


def run(subcommand: str, args: list[str]):
    """``mf <subcommand> <args>`` in this process; returns the LightningCLI object."""
    return main([subcommand, *args])


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard logged under ``log_dir``: tag -> [(step, value)]."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


class FrozenClock:
    """Stands for the ``time`` module where a clock must not move while a test runs: only ``sleep`` moves it on."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def state_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights stored in a Lightning checkpoint: a file, or a sharded folder (FSDP2Strategy)."""
    return read_checkpoint(checkpoint)["state_dict"]
