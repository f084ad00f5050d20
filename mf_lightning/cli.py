"""``mf``: the LightningCLI that fits, validates, tests and samples models from YAML configs.

``mf fit --config configs/quickstart.yaml`` trains; ``mf validate|test|predict --config ... --ckpt_path
last`` evaluate or sample from the latest checkpoint; ``mf efficiency`` prints the parameter and FLOPs
table of every preset. Everything a run writes lives under ``trainer.default_root_dir``: TensorBoard
logs and the resolved config in ``tensorboard/``, checkpoints (``last.ckpt`` and the best by validation
loss) in ``checkpoints/``, so re-running the same command with ``--ckpt_path last`` resumes it.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar, ThroughputMonitor
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from mf_lightning.callbacks import BucketUsageMonitor, GradientCoverageMonitor
from mf_lightning.data import TextDataModule
from mf_lightning.lit.module import LanguageModel
from mf_lightning.lit.predictions import CompletionWriter

TOOLS = {"efficiency": "mf_lightning.models.efficiency"}
TRACEBACK_VARIABLE = "MF_TRACEBACK"
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError)
"""Errors our own checks raise for bad configs and inputs: shown as one line unless MF_TRACEBACK=1."""


def batch_inputs(batch: Any) -> Any:
    """Input ids of an ``(x, y)`` batch or of a ``{"prompt", "input_ids"}`` prediction batch."""
    return batch["input_ids"] if isinstance(batch, dict) else batch[0]


def batch_windows(batch: Any) -> int:
    """Sequences in a batch (for ThroughputMonitor)."""
    return batch_inputs(batch).shape[0]


def batch_tokens(batch: Any) -> int:
    """Tokens in a batch (for ThroughputMonitor)."""
    return batch_inputs(batch).numel()


class MFCLI(LightningCLI):
    """LightningCLI with the data vocabulary linked into the model and our callbacks forced on."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-{step}",
            }
        )
        parser.add_lightning_class_args(BucketUsageMonitor, "bucket_usage")
        parser.add_lightning_class_args(GradientCoverageMonitor, "gradient_coverage")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(config.trainer.default_root_dir or ".", "checkpoints")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            root = trainer_config.get("default_root_dir") or "."
            kwargs["logger"] = TensorBoardLogger(save_dir=root, name="tensorboard", version="")
        if trainer_config.get("enable_progress_bar") is False:
            defaults = self.trainer_defaults["callbacks"]
            self.trainer_defaults["callbacks"] = [c for c in defaults if not isinstance(c, RichProgressBar)]
        return super().instantiate_trainer(**kwargs)


def main(args: Sequence[str] | None = None) -> MFCLI | None:
    """Entry point of ``mf`` and ``python -m mf_lightning``; ``args`` replaces ``sys.argv[1:]``.

    A configuration or input error (bad value, missing file, corrupt checkpoint) ends the program
    with one ``mf: error: ...`` line and exit status 2; ``MF_TRACEBACK=1`` shows the traceback.
    Returns the CLI object (its ``trainer``, ``model`` and ``datamodule``) when run from Python.
    """
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in TOOLS:
            importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
            return None
        return run_cli(None if args is None else argv)
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_VARIABLE) == "1":
            raise
        print(f"mf: error: {error}\n(set {TRACEBACK_VARIABLE}=1 for the full traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def run_cli(args: list[str] | None) -> MFCLI:
    """Builds the CLI (which runs the subcommand) with our trainer defaults; ``None`` reads ``sys.argv``."""
    return MFCLI(
        LanguageModel,
        TextDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "callbacks": [
                RichProgressBar(),
                LearningRateMonitor(logging_interval="step"),
                ThroughputMonitor(batch_size_fn=batch_windows, length_fn=batch_tokens),
                CompletionWriter(),
            ],
            "gradient_clip_val": 1.0,
            "log_every_n_steps": 10,
        },
        parser_kwargs={"description": __doc__},
    )
