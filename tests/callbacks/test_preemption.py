"""PreemptionCheckpoint: SIGTERM during fit saves last.ckpt after the current step; other exceptions save nothing."""

from __future__ import annotations

import logging
import os
import signal
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mf_lightning.callbacks import PreemptionCheckpoint


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.linear(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RaiseAt(pl.Callback):
    """Sends SIGTERM to this process (or raises ``error``) during the training batch ``batch``."""

    def __init__(self, batch: int, error: Exception | None = None) -> None:
        self.batch, self.error = batch, error

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            if self.error is not None:
                raise self.error
            os.kill(os.getpid(), signal.SIGTERM)


def fit(tmp_path, interrupt: RaiseAt, accumulate: int = 1) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=accumulate,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), PreemptionCheckpoint(), interrupt],
    )
    data = TensorDataset(torch.randn(32 * accumulate, 4), torch.randn(32 * accumulate, 1))
    trainer.fit(Regression(), DataLoader(data, batch_size=4))
    return trainer


def test_sigterm_saves_last_after_the_current_step(tmp_path, caplog):
    with caplog.at_level(logging.INFO), pytest.raises(SIGTERMException):
        fit(tmp_path, RaiseAt(batch=2))
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3, "the interrupted step completes before the save"
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 3
    assert f"saved {tmp_path / 'last.ckpt'} at step 3; resume with the same command plus --ckpt_path last" in caplog.text


def test_other_exceptions_save_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, RaiseAt(batch=2, error=RuntimeError("boom")))
    assert not (tmp_path / "last.ckpt").exists()


@pytest.mark.parametrize("accumulate, batch, step", [(4, 5, 2), (4, 4, 2), (4, 3, 1), (2, 0, 1)])
def test_sigterm_inside_an_accumulation_window_saves_after_its_optimizer_step(tmp_path, accumulate, batch, step):
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SIGTERMException):
        fit(tmp_path, RaiseAt(batch=batch), accumulate=accumulate)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == step
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == step * accumulate
    assert signal.getsignal(signal.SIGTERM) == handler, "the SIGTERM handler is given back after the run"


def test_sigterm_never_replaces_another_runs_last_checkpoint(tmp_path, caplog):
    other_run = tmp_path / "last.ckpt"
    other_run.write_bytes(b"the checkpoint of another run")
    with caplog.at_level(logging.INFO), pytest.raises(SIGTERMException), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
        fit(tmp_path, RaiseAt(batch=2))
    assert other_run.read_bytes() == b"the checkpoint of another run"
    (saved,) = tmp_path.glob("preempted-step=3-pid=*.ckpt")
    assert torch.load(saved, weights_only=True)["global_step"] == 3
    assert f"resume with --ckpt_path {saved} (last.ckpt belongs to another run and was left alone)" in caplog.text
