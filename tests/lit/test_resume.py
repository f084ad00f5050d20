"""Resuming keeps the optimizer's moments and the step count, and obeys the config for every optimizer setting."""

from __future__ import annotations

import logging

import pytest
import torch
from cli_support import run, scalars, tiny_run_args, write_corpus

from mf_lightning.lit.optim import WarmupCosineLR

LIGHT = {"model.overrides": "{max_seq_len: 64, code_bits: 4}", "bucket_usage.image_every_n_steps": 1000}


def test_resume_applies_the_configs_lr_schedule_length_and_weight_decay(tmp_path, caplog):
    corpus = write_corpus(tmp_path / "corpus")
    first = run("fit", tiny_run_args(tmp_path, corpus, max_steps=4, **LIGHT))
    assert first.trainer.lr_scheduler_configs[0].scheduler.total_steps == 4
    changed = {
        "model.lr": 1e-3,
        "model.weight_decay": 0.05,
        "model.table_lr_multiplier": 2.0,
        "model.min_lr_ratio": 0.1,
    }
    args = tiny_run_args(tmp_path, corpus, max_steps=8, **LIGHT, **changed) + ["--ckpt_path", "last"]
    with caplog.at_level(logging.INFO):
        resumed = run("fit", args)
    optimizer = resumed.trainer.optimizers[0]
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["tables"]["weight_decay"] == groups["decay"]["weight_decay"] == 0.05
    assert groups["no_decay"]["weight_decay"] == 0.0
    step_counts = {float(state["step"]) for state in optimizer.state.values()}
    assert step_counts == {8.0}, "the moments of the first 4 steps are kept"

    expected = WarmupCosineLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), min_lr_ratio=0.1)
    expected.set_total_steps(8)
    logged = dict(scalars(tmp_path / "tensorboard")["lr-AdamW/decay"])
    for step in range(4, 8):
        assert logged[step] == pytest.approx(1e-3 * expected.lr_factor(step)), f"lr logged at step {step}"
    tables = dict(scalars(tmp_path / "tensorboard")["lr-AdamW/tables"])
    assert tables[7] == pytest.approx(2e-3 * expected.lr_factor(7))

    (line,) = [record.message for record in caplog.records if record.message.startswith("resumed with the config")]
    for change in (
        "tables peak lr 0.003 -> 0.002",
        "tables weight_decay 0.1 -> 0.05",
        "decay peak lr 0.003 -> 0.001",
        "schedule total_steps 4 -> 8",
        "schedule min_lr_ratio 0.01 -> 0.1",
    ):
        assert change in line
    assert "no_decay weight_decay" not in line and "warmup_fraction" not in line, "only changes are listed"


def test_a_resume_from_a_periodic_validations_checkpoint_logs_each_step_once(tmp_path):
    """Resuming from ``last`` continues the logged curves at the next step when the 4-step run's ``last.ckpt``
    came from a validation on the grid (every 2 steps); the test above covers the final one off the grid."""
    corpus = write_corpus(tmp_path / "corpus")
    options = {**LIGHT, "validation.every_n_steps": 2}
    run("fit", tiny_run_args(tmp_path, corpus, max_steps=4, **options))
    run("fit", tiny_run_args(tmp_path, corpus, max_steps=6, **options) + ["--ckpt_path", "last"])
    assert [step for step, _ in scalars(tmp_path / "tensorboard")["lr-AdamW/decay"]] == list(range(6))
