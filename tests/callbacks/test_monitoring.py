"""Helpers shared by the monitors: finding Memory Layers, checking intervals, writing to loggers."""

import csv

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from mf_lightning.callbacks import BucketUsageMonitor, GradientCoverageMonitor
from mf_lightning.callbacks.monitoring import check_every_n_steps, log_scalars, memory_layers, tensorboard_writers
from mf_lightning.nn import MemoryLayer


def test_memory_layers_are_found_by_module_path() -> None:
    qkv, ffn = MemoryLayer(8, 24), MemoryLayer(8, 8)
    model = nn.Sequential(nn.Linear(8, 8), nn.ModuleDict({"attn": nn.ModuleDict({"qkv": qkv}), "ffn": ffn}))
    assert memory_layers(model) == {"1.attn.qkv": qkv, "1.ffn": ffn}
    assert memory_layers(nn.Linear(8, 8)) == {}


def test_interval_check_names_the_argument_and_value() -> None:
    assert check_every_n_steps("every", 7) == 7
    with pytest.raises(ValueError, match="every must be a positive integer number of optimizer steps, got 0"):
        check_every_n_steps("every", 0)


def test_scalars_reach_every_logger_and_only_tensorboard_gives_writers(tmp_path) -> None:
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)
    tb_logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = pl.Trainer(logger=[csv_logger, tb_logger], accelerator="cpu", enable_progress_bar=False)

    log_scalars(trainer, {"memory_usage/gini": 0.25}, step=3)
    csv_logger.save()

    with open(csv_logger.experiment.metrics_file_path) as rows:
        assert [(row["step"], row["memory_usage/gini"]) for row in csv.DictReader(rows)] == [("3", "0.25")]
    assert tensorboard_writers(trainer) == [tb_logger.experiment]


@pytest.mark.parametrize(
    "callback",
    [BucketUsageMonitor(1, 1, enabled=False), GradientCoverageMonitor(1, enabled=False)],
    ids=["bucket_usage", "gradient_coverage"],
)
def test_disabled_monitor_logs_nothing(callback, tiny_module, fit, read_events) -> None:
    tags = read_events(fit(tiny_module, [callback], max_steps=2)).Tags()
    assert not any(tag.startswith("memory_") for kind in ("scalars", "histograms", "images") for tag in tags[kind])
