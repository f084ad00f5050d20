"""A tiny LightningModule of two Memory Layers, a CPU Trainer run of it, its TensorBoard events, and an ``mf fit`` run."""

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cli_support import run, tiny_run_args, write_corpus
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mf_lightning.nn import MemoryLayer

BATCH_SIZE = 8
TOKENS_PER_SAMPLE = 3


class TinyMemoryRegression(pl.LightningModule):
    """Regression through ``hidden`` (4 tables of 16 rows, fed the data) and ``head`` (2 tables).

    ``head`` is called with its input as a keyword, which the monitor's hooks must also see.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hidden = MemoryLayer(16, 8, code_bits=4)
        self.norm = nn.LayerNorm(8)
        self.head = MemoryLayer(8, 4, code_bits=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x=self.norm(self.hidden(x)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def inputs() -> torch.Tensor:
    """Training inputs ``[64, 3, 16]``, served in order in batches of 8."""
    return torch.randn(64, TOKENS_PER_SAMPLE, 16)


@pytest.fixture
def fit(tmp_path, inputs) -> Callable[..., TensorBoardLogger]:
    """Train a module on ``inputs`` for ``max_steps`` on CPU with ``callbacks``; return its TensorBoard logger.

    Validation runs only when ``limit_val_batches`` is given.
    """

    def run(
        module: pl.LightningModule, callbacks: list[pl.Callback], max_steps: int, **trainer_args
    ) -> TensorBoardLogger:
        data = TensorDataset(inputs, torch.randn(len(inputs), TOKENS_PER_SAMPLE, 4))
        loader = DataLoader(data, batch_size=BATCH_SIZE, shuffle=False)
        logger = TensorBoardLogger(tmp_path, name="tb", version=0)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            logger=logger,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            **{"log_every_n_steps": 1, **trainer_args},
        )
        validation = loader if "limit_val_batches" in trainer_args else None
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=validation)
        logger.experiment.flush()
        return logger

    return run


@pytest.fixture
def read_events() -> Callable[[TensorBoardLogger], EventAccumulator]:
    """Everything a TensorBoard logger wrote: scalars, histograms and images, none sampled away."""

    def read(logger: TensorBoardLogger) -> EventAccumulator:
        events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
        events.Reload()
        return events

    return read


class DenseRegression(pl.LightningModule):
    """The same task through ``nn.Linear`` only: a model without Memory Layers."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 4)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.linear(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def tiny_module() -> TinyMemoryRegression:
    return TinyMemoryRegression()


@pytest.fixture
def dense_module() -> DenseRegression:
    return DenseRegression()


def direct_counts(layer: MemoryLayer, x: torch.Tensor) -> torch.Tensor:
    """Tokens per bucket of each table of ``layer`` for inputs ``x``, by one-hot sums: ``[K, 2**code_bits]``."""
    buckets = layer.bucket_indices(x).reshape(-1, layer.num_tables)
    return nn.functional.one_hot(buckets, 2**layer.code_bits).sum(0)


@pytest.fixture
def count_buckets() -> Callable[[MemoryLayer, torch.Tensor], torch.Tensor]:
    return direct_counts


@pytest.fixture(scope="session")
def mf_fit_run(tmp_path_factory) -> Path:
    """``mf fit`` of the debug preset for 6 steps (validation at 3 and 6, usage every 2 steps); its root folder."""
    root = tmp_path_factory.mktemp("mf_fit")
    run("fit", tiny_run_args(root, write_corpus(root / "corpus"), max_steps=6))
    return root
