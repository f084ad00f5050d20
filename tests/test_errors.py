"""Failures the user or the machine must fix are one ``mf: error:`` line naming the culprit; bugs keep tracebacks."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cli_support import run, tiny_run_args, write_corpus
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from mf_lightning import cli
from mf_lightning.callbacks import PreemptionCheckpoint
from mf_lightning.config import ModelConfig
from mf_lightning.lit import LanguageModel
from mf_lightning.lit import checkpoints as checkpoints_module
from mf_lightning.lit.checkpoints import MODEL_CONFIG_KEY, AtomicModelCheckpoint, atomic_save
from mf_lightning.models import build_model


def one_line_error(capsys: pytest.CaptureFixture, exit_info: pytest.ExceptionInfo) -> str:
    """The ``mf: error:`` line of a failed command, checked to come without a traceback and with status 2."""
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("mf: error:")]
    return line


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        (
            "trainer.devices",
            "0",
            r"mf: error: `Trainer\(devices='0'\)` value is not a valid input using cpu accelerator",
        ),
        ("checkpoint.save_top_k", "-2", r"mf: error: Invalid value for save_top_k=-2. Must be >= -1$"),
        ("checkpoint.every_n_train_steps", "-3", r"mf: error: Invalid value for every_n_train_steps=-3. Must be >= 0$"),
        ("checkpoint.mode", "lowest", r"mf: error: `mode` can be min, max but got lowest$"),
    ],
)
def test_lightnings_configuration_errors_are_one_line(setting, value, message, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    with pytest.raises(SystemExit) as exit_info:
        run("fit", tiny_run_args(tmp_path, corpus, **{setting: value}))
    assert re.search(message, one_line_error(capsys, exit_info))


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("trainer.limit_train_batches", "0"),
        ("trainer.limit_train_batches", "0.0"),
        ("trainer.max_steps", "0"),
        ("trainer.max_epochs", "0"),
    ],
)
def test_settings_that_would_train_nothing_are_refused(setting, value, tmp_path, capsys, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    monkeypatch.setattr(LanguageModel, "training_step", lambda *args: pytest.fail("training started"))
    with pytest.raises(SystemExit) as exit_info:
        run("fit", tiny_run_args(tmp_path, corpus, **{setting: value}))
    line = one_line_error(capsys, exit_info)
    assert (
        line == f"mf: error: {setting}={float(value) if '.' in value else int(value)!r} would train nothing; "
        "give a positive value (or run mf validate to only evaluate)"
    )


def test_the_resume_command_replaces_any_checkpoint_path():
    argv = ["fit", "--config", "my config.yaml", "--ckpt_path", "runs/x/best.ckpt", "--trainer.devices", "2"]
    assert cli.resume_command(argv) == "mf fit --config 'my config.yaml' --trainer.devices 2 --ckpt_path last"
    assert cli.resume_command(["fit", "--ckpt_path=runs/x/best.ckpt"]) == "mf fit --ckpt_path last"


@pytest.mark.parametrize(
    ("subcommand", "setting", "value", "message"),
    [
        ("fit", "trainer.accumulate_grad_batches", "0", "trainer.accumulate_grad_batches must be .*, got 0$"),
        ("fit", "trainer.accumulate_grad_batches", "-2", "trainer.accumulate_grad_batches must be .*, got -2$"),
        ("fit", "validation.every_n_steps", "0", r"validation.every_n_steps must be .*, got 0$"),
        ("validate", "validation.every_n_steps", "-1", r"validation.every_n_steps must be .*, got -1$"),
    ],
)
def test_non_positive_trainer_counts_are_one_line(subcommand, setting, value, message, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    with pytest.raises(SystemExit) as exit_info:
        run(subcommand, tiny_run_args(tmp_path, corpus, **{setting: value}))
    assert re.search(message, one_line_error(capsys, exit_info))


def test_a_read_only_checkpoint_folder_is_reported_before_training(tmp_path, capsys, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    read_only = tmp_path / "checkpoints"
    real_temporary_file = tempfile.TemporaryFile

    def read_only_file_system(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real_temporary_file(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only_file_system)
    monkeypatch.setattr(LanguageModel, "training_step", lambda *args: pytest.fail("training started"))
    with pytest.raises(SystemExit) as exit_info:
        run("fit", tiny_run_args(tmp_path, corpus))
    assert one_line_error(capsys, exit_info) == (
        f"mf: error: {read_only}: Read-only file system (checkpoint.dirpath: checkpoints cannot be saved there)"
    )


def test_a_full_disk_while_saving_a_checkpoint_names_it_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")

    def full_disk(checkpoint, file):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints_module.torch, "save", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        run("fit", tiny_run_args(tmp_path, corpus))
    line = one_line_error(capsys, exit_info)
    assert line.startswith(f"mf: error: {tmp_path / 'checkpoints'}/")
    assert line.endswith(".ckpt: No space left on device (saving a checkpoint)")
    assert list((tmp_path / "checkpoints").iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_torch_save_on_a_really_full_device_raises_the_os_error(tmp_path, monkeypatch):
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda path, *args, **kwargs: real_open(Path("/dev/full"), *args, **kwargs))
    with pytest.raises(OSError) as raised:
        atomic_save({"weights": torch.zeros(100_000)}, tmp_path / "last.ckpt")
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(tmp_path / "last.ckpt")


def test_building_the_token_cache_shows_progress(tmp_path, capsys, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    monkeypatch.setattr(LanguageModel, "training_step", lambda *args: (_ for _ in ()).throw(ValueError("stop")))
    with pytest.raises(SystemExit):
        run("fit", tiny_run_args(tmp_path, corpus))
    err = capsys.readouterr().err
    assert "tokenizing the corpus into" in err
    assert "tokenized 24 documents into" in err


def test_export_over_an_existing_file_is_one_line(tmp_path, capsys):
    config = ModelConfig.from_preset("debug")
    model = build_model(config)
    checkpoint = tmp_path / "model.ckpt"
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"state_dict": state, MODEL_CONFIG_KEY: config.to_dict()}, checkpoint)
    (tmp_path / "out.bin").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "out.bin")])
    assert "out.bin is an existing file; a model is saved as a folder" in one_line_error(capsys, exit_info)
    assert (tmp_path / "out.bin").read_text() == "keep me"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_machine_errors_are_one_line_and_other_os_errors_keep_their_traceback(code, capsys, monkeypatch):
    def fail(error):
        def build_cli(args):
            raise error

        return build_cli

    monkeypatch.setattr(cli, "build_cli", fail(OSError(code, os.strerror(code), "/data/runs")))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit"])
    assert one_line_error(capsys, exit_info) == f"mf: error: /data/runs: {os.strerror(code)}"
    monkeypatch.setattr(cli, "build_cli", fail(OSError(errno.EIO, os.strerror(errno.EIO), "/data/runs")))
    with pytest.raises(OSError, match="Input/output error"):
        cli.main(["fit"])


@pytest.mark.slow
def test_hub_dataset_without_network_is_one_line(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    args = tiny_run_args(tmp_path, corpus, **{"data.source": "hf:someone/some-corpus"})
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "mf_lightning", "fit", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "mf: error: dataset hf:someone/some-corpus cannot be downloaded (" in result.stderr


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.nn.functional.mse_loss(self.linear(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_sigterm_save_does_not_log_a_weights_only_default(tmp_path, caplog):
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=8,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AtomicModelCheckpoint(dirpath=tmp_path, save_last=True), PreemptionCheckpoint()],
    )
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    with caplog.at_level(logging.INFO), pytest.raises(SIGTERMException):
        trainer.fit(Regression(), DataLoader(data, batch_size=4))
    assert (tmp_path / "last.ckpt").is_file()
    assert any("SIGTERM received: saved" in message for message in caplog.messages)
    assert not any("weights_only" in message for message in caplog.messages)


@pytest.mark.parametrize(
    "field, valid", [("triton_backward", "deterministic, atomic"), ("kernel_check", "warn, fatal, off")]
)
def test_a_bad_kernel_field_is_one_line(field, valid, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    with pytest.raises(SystemExit) as exit_info:
        run("fit", tiny_run_args(tmp_path, corpus, **{"model.overrides": f"{{{field}: fast, max_seq_len: 64}}"}))
    assert one_line_error(capsys, exit_info).endswith(f"{field} must be one of {valid}; got 'fast'")


def test_a_fatal_kernel_disagreement_is_the_users_one_line():
    """``kernel_check: fatal`` stops the run with one ``mf: error:`` line, not a traceback."""
    from mf_lightning.cli import is_user_error
    from mf_lightning.kernels.guard import KernelDisagreement

    assert is_user_error(KernelDisagreement("triton disagrees with embedding_bag"))
