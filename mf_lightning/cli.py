"""``mf``: the LightningCLI that fits, validates, tests and samples models from YAML configs.

``mf fit --config configs/quickstart.yaml`` trains; ``mf validate|test|predict --config ... --ckpt_path
last`` evaluate or sample from the latest checkpoint; ``mf efficiency`` prints the parameter and FLOPs
table of every preset; ``mf export --ckpt_path X --out DIR`` turns a checkpoint into a safetensors model
folder. Everything a run writes lives under ``trainer.default_root_dir``: TensorBoard logs and the
resolved config in ``tensorboard/``, checkpoints (``last.ckpt`` and the best by validation loss) in
``checkpoints/``, so re-running the same command with ``--ckpt_path last`` resumes it. Validation, and the
checkpoints it writes, come every ``validation.every_n_steps`` optimizer steps and after the final step
(``ValidationSchedule``); the progress bar counts optimizer steps and tokens (``StepProgressBar``).

Checkpoints are written atomically and read without unpickling code (``mf_lightning.lit.checkpoints``);
``mf fit``'s rank 0 claims its run folder with a lock file, so one run writes there at a time (``mf_lightning.lit.run_lock``);
SIGTERM to any rank stops every rank at one optimizer step, saves ``last.ckpt`` and exits with status 143
(``PreemptionCheckpoint``); steps with a non-finite loss or
gradients are skipped and a diverged run stops (``NonFiniteGuard``, options under ``non_finite``).
The model is always built from the config, never from ``--ckpt_path``'s hyper-parameters: a checkpoint
of another model or tokenizer is refused with an error naming both.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, ThroughputMonitor
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from mf_lightning.callbacks import (
    BucketUsageMonitor,
    CheckpointStep,
    EvaluationLogger,
    FlopsModelSummary,
    GradientCoverageMonitor,
    HParamsSummary,
    NonFiniteGuard,
    NonFiniteTrainingError,
    OverviewLayout,
    PreemptionCheckpoint,
    SharedFolderCheck,
    StepProgressBar,
    ValidationSchedule,
)
from mf_lightning.checks import non_negative_number
from mf_lightning.commands import SUBCOMMANDS, option_names, quick_answer
from mf_lightning.config_errors import ConfigError, describe_parse_error
from mf_lightning.data import TextDataModule
from mf_lightning.data.progress import lines_every
from mf_lightning.fs.errors import ENVIRONMENT_ERRNOS, describe
from mf_lightning.fs.remote import is_remote
from mf_lightning.kernels.guard import KernelDisagreement
from mf_lightning.lit.checkpoint_files import UnreadableCheckpoint
from mf_lightning.lit.checkpoints import (
    AtomicCheckpointIO,
    AtomicModelCheckpoint,
    check_run_folder,
    last_checkpoints,
)
from mf_lightning.lit.event_files import follow_event_files
from mf_lightning.lit.lightning_private import (
    ConfigOverCheckpointCLI,
    launched_processes,
    observe_launched_ranks_patiently,
)
from mf_lightning.lit.lost_ranks import RankLostError, lost_rank_error
from mf_lightning.lit.module import FORMER_LOSS_TAGS, LOSS, VAL, LanguageModel, metric_tag
from mf_lightning.lit.override_arguments import merge_overrides, split_overrides
from mf_lightning.lit.predictions import CompletionWriter
from mf_lightning.lit.run_folders import TENSORBOARD, run_folders
from mf_lightning.lit.run_lock import claim_run_folder
from mf_lightning.lit.run_logger import RunLogger
from mf_lightning.lit.slurm_requeue import is_first_task, requeue_slurm_job
from mf_lightning.lit.stop_signals import STOP_SIGNALS_HANDLER, StoppedBySignal, exit_status
from mf_lightning.lit.torchrun_restarts import restart_store_warning

log = logging.getLogger(__name__)

LIGHTNING_INTERNAL_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
"""A torch deprecation that Lightning 2.6's own code triggers; ignored while the CLI runs, nowhere else."""
LIGHTNING_MODULES = r"lightning\."
"""Deprecation warnings attributed to Lightning's own code (Lightning 2.6 calls jsonargparse APIs that newer
jsonargparse releases deprecate): not about the user's config, so ignored while the CLI runs, nowhere else."""
ARGS_AND_ARGV_WARNING = r"LightningCLI's args parameter is intended to run from within Python"
"""LightningCLI's warning when ``args`` is given while the process has its own ``sys.argv`` (a notebook kernel,
pytest): ``main(args)`` is exactly that use, so it is ignored while the CLI runs instead of hiding ``sys.argv``."""

TOOLS = {
    "prepare": "mf_lightning.data.prepare_cli",
    "eval": "mf_lightning.eval.cli",
    "export": "mf_lightning.lit.export",
    "generate": "mf_lightning.lit.generate_cli",
    "efficiency": "mf_lightning.models.efficiency",
    "doctor": "mf_lightning.doctor.cli",
}
"""Subcommands that are not LightningCLI's: each module's ``main(argv)`` parses its own arguments (their one-line
summaries and help snapshots are in ``mf_lightning.commands``)."""
READS_CONFIG = frozenset({"prepare", "eval", "generate", "export"})
"""The ``TOOLS`` that take ``--config``: their ``main(argv, read_config)`` reads it with ``read_config``, the parser
of ``mf fit`` (which lives here, above them), so every subcommand reads a config as ``mf fit`` does."""
TRACEBACK_VARIABLE = "MF_TRACEBACK"
USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    ConnectionError,
    NonFiniteTrainingError,
    MisconfigurationException,
    KernelDisagreement,
)
"""Errors our own checks raise for bad configs and inputs, an unreachable dataset or a diverged run, and
Lightning's configuration errors (``--trainer.devices 0``, ``--checkpoint.save_top_k -2``): one line
unless MF_TRACEBACK=1. Other ``OSError``s are one line too when their errno is in ``ENVIRONMENT_ERRNOS``
(read-only file system, full disk, quota); any other error is a bug and shows its traceback."""


def batch_inputs(batch: Any) -> Any:
    """Input ids of an ``(x, y)`` batch or of a ``{"prompt", "input_ids"}`` prediction batch."""
    return batch["input_ids"] if isinstance(batch, dict) else batch[0]


def batch_windows(batch: Any) -> int:
    """Sequences in a batch (for ThroughputMonitor)."""
    return batch_inputs(batch).shape[0]


def batch_tokens(batch: Any) -> int:
    """Tokens in a batch (for ThroughputMonitor)."""
    return batch_inputs(batch).numel()


LOST_RANK_EXIT_STATUS = 1
"""Exit status of a rank whose fit stopped because another rank was lost (``RankLostError``): resumable."""
TRAINS_NOTHING = ("limit_train_batches", "max_steps", "max_epochs")
"""Trainer settings whose value 0 would make ``fit`` train nothing and still exit 0."""


class MFCLI(ConfigOverCheckpointCLI):
    """LightningCLI with the data vocabulary linked into the model and our callbacks forced on; the model's config
    is the one given, never a ``--ckpt_path``'s hyper-parameters (``ConfigOverCheckpointCLI``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Parses and runs the subcommand (``LightningCLI``); the run folder ``fit`` claims is released when it ends,
        however it ends, a stop signal before training started is passed on to the ranks this process launched
        (which are killed when a second SIGINT stopped training at once), and a rank lost in a multi-rank fit
        becomes a ``RankLostError`` naming it (the ranks this process launches are watched patiently, so that it
        lives to say so: ``observe_launched_ranks_patiently``)."""
        observe_launched_ranks_patiently()
        with ExitStack() as self.claims:
            try:
                super().__init__(*args, **kwargs)
            except StoppedBySignal as stopped:
                trainer = getattr(self, "trainer", None)
                for process in launched_processes(trainer) if trainer is not None else []:
                    if stopped.during_training:
                        process.kill()  # stopping at once: a rank left training would wait for this one
                    else:
                        process.send_signal(stopped.signum)  # the ranks it started stop with it, each with its line
                raise
            except RuntimeError as error:
                lost = lost_rank_error(getattr(self, "trainer", None), error)
                if lost is None:
                    raise
                raise lost from error

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parses ``args`` (``sys.argv[1:]`` when None) into ``self.config``; the command line's
        ``--model.overrides`` merge into the config's key by key (``override_arguments``), and a refused config
        is one ``ConfigError`` line (``config_errors``) instead of the parser's usage dump."""
        argv = list(sys.argv[1:] if args is None else args)
        kept, overrides = split_overrides(argv)
        try:
            if overrides:  # the config's overrides, then all of it parsed again with the merged ones given whole
                base = parser.parse_args([arg for arg in kept if not arg.startswith("--print_config")])
                merged = merge_overrides(base[base.subcommand].model.overrides, overrides)
                kept = [*kept, "--model.overrides", json.dumps(merged)]
            super().parse_arguments(parser, kept)
        except ArgumentError as error:
            subcommand = next((arg for arg in argv if arg in SUBCOMMANDS), "fit")
            message = describe_parse_error(str(error), subcommand, argv, option_names(subcommand))
            raise ConfigError(message) from error

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.add_lightning_class_args(AtomicModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": metric_tag(VAL, LOSS),
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-{step}",
            }
        )
        parser.add_lightning_class_args(BucketUsageMonitor, "bucket_usage")
        parser.add_lightning_class_args(GradientCoverageMonitor, "gradient_coverage")
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite")
        parser.add_lightning_class_args(ValidationSchedule, "validation")
        parser.add_class_arguments(StepProgressBar, "progress", instantiate=True)
        parser.set_defaults({"trainer.check_val_every_n_epoch": None})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for name in ("val_check_interval", "check_val_every_n_epoch"):
            if config.trainer.get(name) is not None:
                raise ValueError(
                    f"trainer.{name}={config.trainer[name]!r} would count validation in micro-batches per epoch; "
                    "remove it and set validation.every_n_steps (optimizer steps) instead"
                )
        monitor = config.checkpoint.monitor
        if monitor in FORMER_LOSS_TAGS:
            raise ValueError(
                f"checkpoint.monitor={monitor!r} names the loss as mf_lightning 0.1.0 logged it; it is logged as "
                f"{FORMER_LOSS_TAGS[monitor]!r} now: set checkpoint.monitor: {FORMER_LOSS_TAGS[monitor]} (a run's saved "
                "config.yaml from then names the former)"
            )
        # before the data module, which may train its tokenizer, is built: preparation logs at training's interval
        self.claims.enter_context(lines_every(non_negative_number("progress.log_every_s", config.progress.log_every_s)))
        folders = run_folders(config)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(folders.checkpoints)
        if self.subcommand == "fit":
            check_trains_something(config.trainer)
            start_afresh_without_last(config)
        else:
            check_run_folder(self.subcommand, config.get("ckpt_path"), str(config.checkpoint.dirpath))

    def prepare_run_folder(self, trainer: Trainer) -> None:
        """For ``fit``, once the Trainer knows this process's rank: rank 0 claims the run folder (``claim_run_folders``),
        then the checkpoint folder is checked; under torchrun, rank 0 warns when a restart would reuse the dead
        attempt's store (``torchrun_restarts``).

        The rank is the Trainer's, from the cluster environment Lightning chose (SLURM, torchelastic, LSF, MPI, a
        configured plugin, or its own launcher's ``LOCAL_RANK``/``NODE_RANK``), so exactly the process that will be
        global rank 0 claims: processes that Lightning runs as separate jobs (each its own rank 0) each claim and
        exclude one another.
        """
        config = self.config[self.subcommand]
        root = str(run_folders(config).root)
        if trainer.is_global_zero:
            self.claim_run_folders(root, str(config.checkpoint.dirpath))
            warning = restart_store_warning(os.environ)
            if warning is not None:
                log.warning(warning)
        check_writable(config.checkpoint.dirpath, "checkpoint.dirpath")
        check_run_folder(self.subcommand, config.get("ckpt_path"), str(config.checkpoint.dirpath))

    def claim_run_folders(self, root: str, checkpoints: str) -> None:
        """Locks the run folder, and the checkpoint folder when it lies outside it, until this CLI ends."""
        folders = [root]
        if not Path(os.path.abspath(checkpoints)).is_relative_to(os.path.abspath(root)):
            folders.append(checkpoints)
        for folder in folders:
            if not is_remote(folder):  # remote folders cannot be locked with a file; they are not claimed
                self.claims.enter_context(claim_run_folder(Path(folder)))

    def section(self, config: Any, key: str) -> Any:
        """``config``'s ``key`` for the subcommand being run (the whole config has one section per subcommand)."""
        return (config[self.subcommand] if self.subcommand else config).get(key)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self.section(self.config_init, "trainer") or {}
        root = trainer_config.get("default_root_dir") or "."
        if self.subcommand != "fit":
            # only fit describes the run: the saved config re-runs as mf fit, never with a subcommand's keys
            self.save_config_callback = None
            if trainer_config.get("logger") is not False:
                # beside the run, never into its training curves: <root>/validate, <root>/test, <root>/predict,
                # at the checkpoint's step (CheckpointStep)
                kwargs["logger"] = EvaluationLogger(
                    save_dir=root, name=self.subcommand, version="", default_hp_metric=False
                )
        elif trainer_config.get("logger") in (None, True):
            # where run_folders says the default logger writes; no hp_metric placeholder scalar: HParamsSummary
            # names the metrics of the HParams table
            kwargs["logger"] = RunLogger(save_dir=root, name=TENSORBOARD, version="", default_hp_metric=False)
        defaults = self.trainer_defaults["callbacks"]
        if trainer_config.get("enable_progress_bar") is not False:
            defaults = [self.section(self.config_init, "progress"), *defaults]
        if trainer_config.get("enable_model_summary") is False:
            defaults = [c for c in defaults if not isinstance(c, ModelSummary)]
        self.trainer_defaults["callbacks"] = defaults
        kwargs["enable_model_summary"] = False  # FlopsModelSummary, when kept, replaces Lightning's default one
        schedule = self.section(self.config_init, "validation")
        kwargs.update(schedule.trainer_arguments(trainer_config.get("accumulate_grad_batches", 1)))
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit":
            self.prepare_run_folder(trainer)
        follow_logged_event_files(trainer)
        return trainer


def follow_logged_event_files(trainer: Trainer) -> None:
    """Before any writer exists, on the rank that writes: each TensorBoard logger's new event file will sort after
    those its folder holds (a resumed run's values are read last, ``event_files``); remote folders are not listed."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and not is_remote(logger.log_dir):
            follow_event_files(Path(logger.log_dir))


class ParsedConfig(Exception):
    """Carries the parsed config out of ``ConfigReader``'s constructor, before anything is built or run."""

    def __init__(self, config: Namespace) -> None:
        super().__init__("parsed")
        self.config = config


class ConfigReader(MFCLI):
    """``MFCLI``'s parser and defaults, stopped right after parsing: nothing is instantiated, seeded or run.

    ``LightningCLI.parse_arguments`` is its public step that parses; everything after it (seeding, building
    the model, data and trainer, running) is skipped by leaving the constructor from there."""

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        raise ParsedConfig(self.config["fit"])


def read_config(files: Sequence[str | os.PathLike]) -> Namespace:
    """The ``mf fit`` config of the YAML ``files`` (a later file overrides an earlier one), parsed by ``mf fit``'s
    own parser with its defaults: every subcommand that takes ``--config`` reads it through here.

    A missing file or a config ``mf fit`` would refuse is one ``ValueError``/``FileNotFoundError`` naming it."""
    for file in files:
        if not Path(file).is_file():
            raise FileNotFoundError(f"config file {file} does not exist")
    args = ["fit", *(argument for file in files for argument in ("--config", str(file)))]
    try:
        build_cli(args, ConfigReader)
    except ParsedConfig as parsed:
        return parsed.config
    except ConfigError as error:
        if any(str(file) in str(error) for file in files):  # it names the file already
            raise
        raise ConfigError(f"config {', '.join(map(str, files))} is not one mf fit can run: {error}") from None
    raise RuntimeError("ConfigReader returned without a config")  # parse_arguments always raises ParsedConfig


def start_afresh_without_last(config: Namespace) -> None:
    """``mf fit --ckpt_path last`` in a folder without a last checkpoint starts from scratch, said in one line (not
    Lightning's warning): one unchanged command serves the first start and every restart."""
    dirpath = str(config.checkpoint.dirpath)
    if config.get("ckpt_path") == "last" and not is_remote(dirpath) and not last_checkpoints(dirpath):
        rank_zero_info(f"--ckpt_path last: {dirpath} holds no last checkpoint yet; starting from scratch")
        config.ckpt_path = None


def check_trains_something(trainer_config: Any) -> None:
    """Refuses trainer settings with which ``fit`` would train nothing and still exit 0 (``TRAINS_NOTHING``)."""
    for name in TRAINS_NOTHING:
        if trainer_config.get(name) == 0:
            raise ValueError(
                f"trainer.{name}={trainer_config[name]!r} would train nothing; give a positive value "
                "(or run mf validate to only evaluate)"
            )


def resume_command(argv: Sequence[str]) -> str:
    """``mf <argv>`` with ``--ckpt_path last`` in place of any ``--ckpt_path`` given."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join(["mf", *kept, "--ckpt_path", "last"])


def check_writable(folder: str, option: str) -> None:
    """Creates ``folder`` and a file in it, so a read-only or full location fails now rather than at the first save."""
    if is_remote(folder):
        return
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OSError(error.errno, f"{error.strerror} ({option}: checkpoints cannot be saved there)", folder) from error


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (a notebook or pytest may replace it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        """Ignored: the stream is always the current ``sys.stderr``."""


def show_progress_logs() -> None:
    """Shows this package's INFO log lines (cache and tokenizer building, their progress) on stderr."""
    logger = logging.getLogger("mf_lightning")
    if not any(isinstance(handler, StderrHandler) for handler in logger.handlers):
        logger.addHandler(StderrHandler())
        logger.setLevel(logging.INFO)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's or the machine's to fix (see ``USER_ERRORS``) rather than a bug."""
    return isinstance(error, USER_ERRORS) or (isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS)


def main(args: Sequence[str] | None = None) -> MFCLI | None:
    """``mf <args>`` from Python (``args`` replaces ``sys.argv[1:]``); the ``mf`` command's entry point,
    ``mf_lightning.__main__.main``, does the same after answering help without importing this module.

    A configuration or input error (bad value, missing file, corrupt checkpoint, a run folder in use) or a
    file-system failure (read-only or full disk, no permission) ends the program with one ``mf: error: ...``
    line and exit status 2; ``MF_TRACEBACK=1`` shows the traceback. A rank lost in a multi-rank fit is one
    line on the surviving ranks naming it and the command that resumes, exit status 1.
    SIGTERM stops ``fit`` with a saved checkpoint and exit status 143 (128 + 15, ``PreemptionCheckpoint``);
    it stops ``validate``/``test`` before their results with one ``mf: error:`` line and the same status.
    Called from Python with ``args`` (a notebook, a script), it returns the CLI object with its
    ``trainer``, ``model`` and ``datamodule``; as the ``mf`` command it returns None (exit status 0).
    """
    argv = list(sys.argv[1:] if args is None else args)
    status = quick_answer(argv)
    if status is not None:
        if status:
            raise SystemExit(status)
        return None
    return run_subcommand(argv, from_python=args is not None)


def run_subcommand(argv: list[str], from_python: bool) -> MFCLI | None:
    """Runs ``mf <argv>`` (a subcommand, after ``quick_answer``); returns the CLI object when ``from_python``.
    Errors become one ``mf: error:`` line and an exit status, as ``main`` describes."""
    show_progress_logs()
    try:
        if argv and argv[0] in TOOLS:
            tool = importlib.import_module(TOOLS[argv[0]])
            tool.main(argv[1:], read_config) if argv[0] in READS_CONFIG else tool.main(argv[1:])
            return None
        with STOP_SIGNALS_HANDLER.owning():
            cli = build_cli(argv if from_python else None)
        return cli if from_python else None
    except RankLostError as error:
        if os.environ.get(TRACEBACK_VARIABLE) == "1":
            raise
        print(
            f"mf: error: {error}; resume every rank from the last checkpoint with: {resume_command(argv)}",
            file=sys.stderr,
        )
        raise SystemExit(LOST_RANK_EXIT_STATUS) from None
    except ConfigError as error:  # the parser's refusal: its traceback would show only the parser
        if os.environ.get(TRACEBACK_VARIABLE) == "1":
            raise
        print(f"mf: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as error:
        if not is_user_error(error) or os.environ.get(TRACEBACK_VARIABLE) == "1":
            raise
        if isinstance(error, UnreadableCheckpoint) and rank_zero_only.rank != 0:
            raise SystemExit(2) from None  # every rank raised it: rank 0 (as Lightning knows it) reports it
        message = describe(error) if isinstance(error, OSError) else str(error)
        print(f"mf: error: {message}\n(set {TRACEBACK_VARIABLE}=1 for the full traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:
        raise SystemExit(exit_status(STOP_SIGNALS_HANDLER.agreed or {signal.SIGTERM})) from None
    except StoppedBySignal as stopped:
        raise SystemExit(signal_stop(argv, stopped.signum, stopped.during_training)) from None


def signal_stop(argv: list[str], signum: int, during_training: bool = False) -> int:
    """Says in one line that ``signum`` stopped ``mf <argv>`` outside the fit loop (while preparing, or evaluating)
    or, ``during_training``, at once inside it (a second SIGINT), requeues a SLURM job after SIGUSR1 (on the first
    task), and returns the exit status."""
    name, subcommand = signal.Signals(signum).name, argv[0] if argv else "mf"
    if during_training:
        what = (
            "mf fit at once (a second SIGINT), without saving this step; resume from the last saved checkpoint with: "
            f"{resume_command(argv)}"
        )
    elif subcommand == "fit":
        what = "mf fit before training started (while preparing its data or model); nothing was saved; run it again"
    else:
        what = f"{subcommand} before it finished; no results were reported"
    print(f"mf: error: {name} stopped {what}", file=sys.stderr)
    if signum == signal.SIGUSR1 and is_first_task():
        requeued = requeue_slurm_job()
        if requeued is not None:
            print(f"mf: {requeued}", file=sys.stderr)
    return exit_status({signum})


def build_cli(args: list[str] | None, cli_class: type[MFCLI] = MFCLI) -> MFCLI:
    """The ``cli_class`` of ``args`` (of ``sys.argv`` when ``None``); constructing it runs the subcommand.
    A config the parser refuses raises ``ConfigError`` (one line) instead of printing usage and exiting."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LIGHTNING_INTERNAL_WARNING)
        warnings.filterwarnings("ignore", message=ARGS_AND_ARGV_WARNING)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=LIGHTNING_MODULES)
        return new_cli(args, cli_class)


def new_cli(args: list[str] | None, cli_class: type[MFCLI] = MFCLI) -> MFCLI:
    """Constructs (and so runs) the ``cli_class`` of ``args`` with our trainer defaults."""
    return cli_class(
        LanguageModel,
        TextDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "callbacks": [
                FlopsModelSummary(),
                LearningRateMonitor(logging_interval="step"),
                ThroughputMonitor(batch_size_fn=batch_windows, length_fn=batch_tokens),
                OverviewLayout(),
                HParamsSummary(),
                CompletionWriter(),
                PreemptionCheckpoint(),
                CheckpointStep(),
                SharedFolderCheck(),
            ],
            "gradient_clip_val": 1.0,
            "log_every_n_steps": 10,
        },
        parser_kwargs={
            "prog": "mf",
            "description": __doc__,
            "exit_on_error": False,  # MFCLI.parse_arguments reports a refused config in one line
            **{subcommand: {"exit_on_error": False} for subcommand in MFCLI.subcommands()},
        },
    )
