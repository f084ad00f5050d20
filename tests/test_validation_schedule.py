"""Validation (and the checkpoints it writes) every N optimizer steps and at the final step, for every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_support import REPO, run, tiny_run_args, write_corpus

from mf_lightning.callbacks import ValidationSchedule
from mf_lightning.cli import read_config

EVERY, MAX_STEPS, EPOCH_STEPS = 2, 5, 3
"""Validate every 2 steps of a 5-step run whose epochs last 3 steps: off both grids, as in the issue."""


def validated_steps(checkpoints: Path) -> list[int]:
    """Steps of the checkpoints kept at each validation (saved as ``val-step=N.ckpt``)."""
    return sorted(int(path.stem.split("=")[1]) for path in checkpoints.glob("val-step=*.ckpt"))


def final_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


FAST_CONFIGS = ("quickstart.yaml", "ddp_example.yaml")
"""Configs cheap enough for the fast lane; the others' larger presets take 20-50 s each on 2 cores."""


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(path, marks=() if path.name in FAST_CONFIGS else pytest.mark.slow)
        for path in sorted((REPO / "configs").glob("*.yaml"))
    ],
    ids=lambda p: p.name,
)
def test_every_shipped_config_validates_every_n_steps_and_at_the_end(config: Path, tmp_path: Path) -> None:
    """The config's own accumulation and epoch rounding on a debug model, one CPU device, tiny windows."""
    accumulate = read_config([config]).trainer.accumulate_grad_batches
    batch_size = 1
    corpus = write_corpus(tmp_path / "corpus")
    args = ["--config", str(config)] + tiny_run_args(
        tmp_path,
        corpus,
        max_steps=MAX_STEPS,
        **{
            "trainer.accelerator": "cpu",
            "trainer.devices": 1,
            "trainer.strategy": "auto",
            "trainer.precision": "32-true",
            "trainer.limit_val_batches": 1,
            "trainer.num_sanity_val_steps": 0,
            "trainer.log_every_n_steps": 10,
            "validation.every_n_steps": EVERY,
            "model.preset": "debug",
            "model.overrides": "{max_seq_len: 8, n_layer: 1, n_embd: 16, code_bits: 4}",
            "data.tokenizer": "byte",
            "data.seq_len": 8,
            "data.batch_size": batch_size,
            "data.num_workers": 0,
            "data.val_windows": 2,
            "data.train_samples_per_epoch": EPOCH_STEPS * accumulate * batch_size,
            "checkpoint.save_top_k": -1,
            "checkpoint.filename": "val-{step}",
            "bucket_usage.enabled": False,
            "gradient_coverage.enabled": False,
        },
    )[2:]
    cli = run("fit", args)
    assert cli.trainer.accumulate_grad_batches == accumulate
    assert cli.trainer.num_training_batches == EPOCH_STEPS * accumulate
    assert validated_steps(tmp_path / "checkpoints") == [2, 4, 5]
    assert final_step(tmp_path / "checkpoints" / "last.ckpt") == MAX_STEPS


@pytest.mark.slow
def test_final_steps_are_validated_and_saved_off_the_interval(tmp_path: Path) -> None:
    """max_steps=5 with validation every 3 steps: last.ckpt holds step 5 and its weights, and best sees it."""
    corpus = write_corpus(tmp_path / "corpus")
    cli = run(
        "fit",
        tiny_run_args(
            tmp_path, corpus, max_steps=5, **{"checkpoint.save_top_k": -1, "checkpoint.filename": "val-{step}"}
        ),
    )
    checkpoints = tmp_path / "checkpoints"
    assert validated_steps(checkpoints) == [3, 5]
    saved = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 5
    final = cli.model.state_dict()
    assert all(torch.equal(final[name], value) for name, value in saved["state_dict"].items())


@pytest.mark.parametrize("accumulate, every, interval", [(1, 500, 500), (16, 500, 8000), (32, 3, 96)])
def test_interval_is_counted_in_micro_batches_across_epochs(accumulate: int, every: int, interval: int) -> None:
    arguments = ValidationSchedule(every).trainer_arguments(accumulate)
    assert arguments == {"val_check_interval": interval, "check_val_every_n_epoch": None}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"validation.every_n_steps": 0}, "validation.every_n_steps must be a positive integer, got 0"),
        ({"validation.every_n_steps": -5}, "validation.every_n_steps must be a positive integer, got -5"),
        ({"trainer.accumulate_grad_batches": 0}, "trainer.accumulate_grad_batches must be a positive integer, got 0"),
        ({"trainer.val_check_interval": 100}, "trainer.val_check_interval=100 would count validation in micro-batches"),
        ({"trainer.check_val_every_n_epoch": 1}, "trainer.check_val_every_n_epoch=1 would count validation"),
        ({"checkpoint.monitor": "val/loss"}, "checkpoint.monitor='val/loss' names the loss as mf_lightning 0.1.0"),
    ],
)
def test_bad_validation_settings_fail_with_one_clear_line(overrides, message, tmp_path, capsys) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    with pytest.raises(SystemExit) as exit_info:
        run("fit", tiny_run_args(tmp_path, corpus, **overrides))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
