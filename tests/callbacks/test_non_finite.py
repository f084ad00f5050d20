"""NonFiniteGuard: bad steps leave weights and optimizer state untouched, are counted, agree over ranks, and stop a run."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mf_lightning.callbacks import NonFiniteGuard, NonFiniteTrainingError


class Regression(pl.LightningModule):
    """A linear regression trained with AdamW whose loss is NaN at the batches in ``nan_loss_at``."""

    def __init__(self, nan_loss_at: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.nan_loss_at = nan_loss_at

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.linear(x), y)
        return loss * float("nan") if batch_idx in self.nan_loss_at else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.1)


class NanGradients(pl.Callback):
    """Makes the weight gradient NaN after the backward pass of the batches in ``steps``."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step in self.steps:
            pl_module.linear.weight.grad[0, 0] = float("nan")


class WeightRecorder(pl.Callback):
    """The weight after every training batch."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(pl_module.linear.weight.detach().clone())


def fit(module: Regression, callbacks: list[pl.Callback], max_steps: int = 6) -> pl.Trainer:
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    return trainer


@pytest.mark.parametrize("poison", ["loss", "gradients"])
def test_bad_steps_change_nothing_and_are_counted(poison):
    guard, recorder = NonFiniteGuard(max_consecutive=3), WeightRecorder()
    module = Regression(frozenset({2, 3}) if poison == "loss" else frozenset())
    callbacks = [guard, recorder] + ([NanGradients({2, 3})] if poison == "gradients" else [])
    with pytest.warns(UserWarning, match=r"step 2: non-finite loss or gradients, optimizer step skipped \(1 in a row"):
        trainer = fit(module, callbacks)
    weights = recorder.weights
    assert torch.equal(weights[1], weights[2]) and torch.equal(weights[2], weights[3])
    assert not torch.equal(weights[3], weights[4]) and torch.isfinite(weights[-1]).all()
    optimizer_state = trainer.optimizers[0].state[module.linear.weight]
    assert optimizer_state["step"].item() == 4, "skipped steps must not advance AdamW"
    assert trainer.global_step == 6
    assert guard.skipped_steps == 2 and guard.consecutive == 0
    assert trainer.callback_metrics["train/skipped_steps"].item() == 2


def test_too_many_bad_steps_in_a_row_stop_the_run():
    module = Regression(frozenset(range(1, 6)))
    with (
        pytest.warns(UserWarning),
        pytest.raises(NonFiniteTrainingError, match="3 optimizer steps in a row .*diverged"),
    ):
        fit(module, [NonFiniteGuard(max_consecutive=3)])


def test_a_bad_step_on_another_rank_is_skipped_here_too(monkeypatch):
    decisions = []

    def other_rank_fails_at_step_1(strategy, decision, all=True):
        decisions.append((decision, all))
        return decision and len(decisions) != 2

    monkeypatch.setattr(SingleDeviceStrategy, "reduce_boolean_decision", other_rank_fails_at_step_1)
    guard, recorder = NonFiniteGuard(), WeightRecorder()
    with pytest.warns(UserWarning, match="step 1: non-finite"):
        fit(Regression(), [guard, recorder], max_steps=3)
    assert decisions == [(True, True)] * 3
    assert guard.skipped_steps == 1 and torch.equal(recorder.weights[0], recorder.weights[1])


def test_under_a_grad_scaler_overflowing_gradients_are_left_to_the_scaler():
    guard = NonFiniteGuard()
    trainer = SimpleNamespace(
        precision_plugin=SimpleNamespace(scaler=torch.amp.GradScaler("cpu")),
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
        global_step=0,
    )
    module = SimpleNamespace(log=lambda *args, **kwargs: None)
    parameter = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    parameter.grad = torch.tensor([float("inf"), 0.0])
    guard.on_before_backward(trainer, module, torch.tensor(1.0))
    guard.on_before_optimizer_step(trainer, module, optimizer)
    assert guard.skipped_steps == 0 and parameter.grad is not None
    guard.on_before_backward(trainer, module, torch.tensor(float("inf")))
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        guard.on_before_optimizer_step(trainer, module, optimizer)
    assert guard.skipped_steps == 1 and parameter.grad is None


def test_counters_survive_a_resume():
    guard = NonFiniteGuard()
    guard.skipped_steps, guard.consecutive = 5, 2
    resumed = NonFiniteGuard()
    resumed.load_state_dict(guard.state_dict())
    assert (resumed.skipped_steps, resumed.consecutive) == (5, 2)


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_max_consecutive_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match=f"max_consecutive must be a positive integer .*got {value!r}"):
        NonFiniteGuard(max_consecutive=value)
