"""PreemptionCheckpoint: SIGTERM to any rank during fit stops every rank after one optimizer step and saves last.ckpt,
which a resume continues; other exceptions save nothing."""

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
from mf_lightning.lit.checkpoints import AtomicModelCheckpoint


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


def fit(
    tmp_path, *interrupts: pl.Callback, accumulate: int = 1, checkpoint=ModelCheckpoint, ckpt_path=None
) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=8,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=accumulate,
        callbacks=[checkpoint(dirpath=tmp_path, save_last=True), PreemptionCheckpoint(), *interrupts],
    )
    data = TensorDataset(torch.randn(32 * accumulate, 4), torch.randn(32 * accumulate, 1))
    trainer.fit(Regression(), DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    return trainer


def test_sigterm_saves_last_after_the_current_step(tmp_path, caplog):
    """Also pins what the agreed stop relies on: Lightning stops after the batch, with its progress counted as
    complete, once its signal connector's ``received_sigterm`` is set at the batch's end."""
    with caplog.at_level(logging.INFO), pytest.raises(SIGTERMException):
        fit(tmp_path, RaiseAt(batch=2))
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3, "the interrupted step completes before the save"
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 3
    assert (
        f"saved {tmp_path / 'last.ckpt'} at step 3; resume with the same command plus --ckpt_path last" in caplog.text
    )


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


@pytest.mark.parametrize("checkpoint", [ModelCheckpoint, AtomicModelCheckpoint])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_resume_after_a_sigterm_before_any_periodic_save_continues_last(tmp_path, accumulate, checkpoint):
    with pytest.raises(SIGTERMException):
        fit(tmp_path, RaiseAt(batch=1), accumulate=accumulate, checkpoint=checkpoint)
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]
    fit(tmp_path, accumulate=accumulate, checkpoint=checkpoint, ckpt_path=tmp_path / "last.ckpt")
    assert "last-v1.ckpt" not in [path.name for path in tmp_path.iterdir()]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 8


class SigtermOnAnotherRank(pl.Callback):
    """Plays a 2-rank world whose rank 1 got SIGTERM during step ``step``: the reductions PreemptionCheckpoint
    makes at each optimizer step see rank 1's flag from then on; this process itself gets no signal."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_start(self, trainer, pl_module) -> None:
        strategy = trainer.strategy

        def other_rank_received() -> bool:
            return trainer.global_step >= self.step

        def reduce_boolean_decision(decision: bool, all: bool = True) -> bool:
            return decision or other_rank_received()

        def all_gather(tensor, group=None, sync_grads=False):
            return torch.stack([tensor, torch.full_like(tensor, other_rank_received())])

        strategy.reduce_boolean_decision = reduce_boolean_decision
        strategy.all_gather = all_gather


def test_a_sigterm_on_another_rank_stops_this_one_at_the_same_step(tmp_path, caplog):
    with caplog.at_level(logging.INFO), pytest.raises(SIGTERMException):
        fit(tmp_path, SigtermOnAnotherRank(step=3))
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 3
    assert "SIGTERM received by rank 1 of 1: every rank stops after step 3 and saves" in caplog.text


def test_a_sigterm_while_a_fit_runs_never_reaches_lightnings_handler(tmp_path, monkeypatch):
    """Lightning's handler broadcasts from inside the signal handler of the one rank that got the signal,
    which hangs a multi-rank job; during a fit only PreemptionCheckpoint's handler may run."""
    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    monkeypatch.setattr(_SignalConnector, "_sigterm_notifier_fn", lambda *args: pytest.fail("Lightning's handler ran"))
    with pytest.raises(SIGTERMException):
        fit(tmp_path, RaiseAt(batch=2))
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_callback_that_stopped_one_fit_lets_the_next_fit_run(tmp_path):
    callback = PreemptionCheckpoint()
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    for interrupts, folder in (([RaiseAt(batch=2)], "first"), ([], "second")):
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=8,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[ModelCheckpoint(dirpath=tmp_path / folder, save_last=True), callback, *interrupts],
        )
        try:
            trainer.fit(Regression(), DataLoader(data, batch_size=4))
        except SIGTERMException:
            assert folder == "first"
    assert trainer.global_step == 8


class SignalAtBatch(pl.Callback):
    def __init__(self, batch: int, signum: int) -> None:
        self.batch, self.signum = batch, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_sigusr1_and_sigint_stop_at_the_step_like_sigterm_and_the_handlers_are_given_back(tmp_path, caplog, signum):
    before = {stop: signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    with caplog.at_level(logging.INFO), pytest.raises(SIGTERMException):
        fit(tmp_path, SignalAtBatch(2, signum))
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3
    assert f"{signum.name} received by rank 0 of 1: every rank stops after step 3 and saves" in caplog.text
    assert {stop: signal.getsignal(stop) for stop in before} == before
