"""GradientCoverageMonitor in a real CPU Trainer run, and its statistics on hand-set gradients."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from mf_lightning.callbacks import GradientCoverageMonitor, gradient_coverage
from mf_lightning.callbacks.gradient_coverage import gradient_statistics
from mf_lightning.callbacks.usage_metrics import used_fraction
from mf_lightning.nn import MemoryLayer

BATCH = 8
COVERAGE_TAGS = ("memory_grad_coverage/hidden", "memory_grad_coverage/head", "memory_grad_summary/table_row_coverage")
NORM_TAGS = ("memory_grad_summary/table_norm", "memory_grad_summary/other_norm")
TAGS = COVERAGE_TAGS + NORM_TAGS


def test_logs_coverage_and_norms_every_n_steps(tiny_module, inputs, fit, read_events, count_buckets) -> None:
    events = read_events(fit(tiny_module, [GradientCoverageMonitor(log_every_n_steps=2)], max_steps=4))
    for tag in TAGS:
        assert [e.step for e in events.Scalars(tag)] == [0, 2]
    for tag in COVERAGE_TAGS:
        assert all(0 < e.value <= 1 for e in events.Scalars(tag))
    for tag in NORM_TAGS:
        assert all(math.isfinite(e.value) and e.value > 0 for e in events.Scalars(tag))

    first_batch_rows_used = used_fraction(count_buckets(tiny_module.hidden, inputs[:BATCH])).mean().item()
    assert events.Scalars("memory_grad_coverage/hidden")[0].value == pytest.approx(first_batch_rows_used, rel=1e-6)


def test_statistics_of_hand_set_gradients() -> None:
    module = nn.ModuleDict(
        {"a": MemoryLayer(8, 3, code_bits=4), "b": MemoryLayer(4, 2, code_bits=2), "dense": nn.Linear(2, 2)}
    )
    layers = {"a": module["a"], "b": module["b"]}
    module["a"].tables.grad = torch.zeros_like(module["a"].tables)
    module["a"].tables.grad[0, 3] = torch.tensor([3.0, 0.0, 0.0])
    module["a"].tables.grad[1, 15, 2] = 4.0
    module["a"].bias.grad = torch.full((3,), 2.0)
    module["dense"].weight.grad = torch.zeros(2, 2)

    statistics = gradient_statistics(module, layers)

    assert statistics == pytest.approx(
        {
            "memory_grad_coverage/a": 2 / 32,
            "memory_grad_coverage/b": 0.0,
            "memory_grad_summary/table_row_coverage": 2 / (32 + 8),
            "memory_grad_summary/table_norm": 5.0,
            "memory_grad_summary/other_norm": math.sqrt(3 * 4.0),
        }
    )


def test_model_without_memory_layers_gets_one_info_and_no_logs(dense_module, fit, read_events, monkeypatch) -> None:
    messages = []
    monkeypatch.setattr(gradient_coverage, "rank_zero_info", messages.append)
    events = read_events(fit(dense_module, [GradientCoverageMonitor(log_every_n_steps=1)], max_steps=2))
    assert len(messages) == 1 and "no MemoryLayer" in messages[0]
    assert not any(tag.startswith("memory_") for tag in events.Tags()["scalars"])


def test_only_rank_zero_writes(tiny_module, fit, read_events, monkeypatch) -> None:
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda trainer: False))
    events = read_events(fit(tiny_module, [GradientCoverageMonitor(log_every_n_steps=1)], max_steps=2))
    assert not any(tag.startswith("memory_") for tag in events.Tags()["scalars"])


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "50"])
def test_bad_interval_is_rejected(value) -> None:
    with pytest.raises(ValueError, match=f"log_every_n_steps must be a positive integer.*got {value!r}"):
        GradientCoverageMonitor(log_every_n_steps=value)
