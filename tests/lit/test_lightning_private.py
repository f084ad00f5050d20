"""Canaries of ``mf_lightning.lit.lightning_private``: each fails when Lightning changes the private behaviour that
one entry of that module relies on (see docs/private-lightning-hooks.md), so a Lightning upgrade names what broke."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies import model_parallel as lightning_model_parallel
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from mf_lightning.lit import lightning_private
from mf_lightning.lit.lightning_private import (
    BATCH_PROGRESS_KEY,
    LOGGING_STEP_KEY,
    LOOP_STATE_KEY,
    ConfigOverCheckpointCLI,
    ModelCheckpointSteps,
    PatientChildObserver,
    align_logging_step,
    event_file_writer,
    keep_signal_handlers,
    launched_processes,
    make_every_rank_data_parallel,
    mark_sigterm_received,
    observe_launched_ranks_patiently,
    validates_after_this_batch,
)


class Regression(pl.LightningModule):
    """The smallest module that trains, validates and logs: one linear layer."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.linear = nn.Linear(width, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = nn.functional.mse_loss(self.linear(batch[0]), batch[1])
        self.log("train", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val", nn.functional.mse_loss(self.linear(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch) -> None:
    """Trainers without a checkpoint folder of their own write theirs (``checkpoints/``) in the working folder."""
    monkeypatch.chdir(tmp_path)


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=4)


def trainer(max_steps: int = 4, callbacks: tuple = (), logger: Logger | bool = False, **options) -> pl.Trainer:
    """A CPU trainer that validates (one batch) every 2 batches, counted across epochs as ``mf`` counts them."""
    settings = {"num_sanity_val_steps": 0, "val_check_interval": 2, "check_val_every_n_epoch": None, **options}
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        callbacks=list(callbacks),
        **settings,
    )


# --- ConfigOverCheckpointCLI: LightningCLI._parse_ckpt_path ----------------------------------------------------


class ConfigAtInstantiation(Exception):
    """Raised by ``StopBeforeRunning`` with the config LightningCLI would instantiate the classes from."""


class StopBeforeRunning:
    def before_instantiate_classes(self) -> None:
        raise ConfigAtInstantiation(self.config)


def config_after_parsing(cli_class: type[LightningCLI], checkpoint: str) -> object:
    cli = type("Probe", (StopBeforeRunning, cli_class), {})
    with pytest.raises(ConfigAtInstantiation) as stopped:
        cli(Regression, args=["fit", "--model.width", "4", "--ckpt_path", checkpoint], save_config_callback=None)
    return stopped.value.args[0]


def test_lightning_cli_replaces_the_config_with_the_checkpoints_hparams_in_parse_ckpt_path(tmp_path):
    """LightningCLI still overwrites the model's arguments from --ckpt_path's hyper-parameters, and does it in
    ``_parse_ckpt_path``: overriding that (ConfigOverCheckpointCLI) keeps the config as given."""
    checkpoint = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"width": 8}}, checkpoint)
    assert config_after_parsing(LightningCLI, str(checkpoint)).fit.model.width == 8
    assert config_after_parsing(ConfigOverCheckpointCLI, str(checkpoint)).fit.model.width == 4
    assert list(inspect.signature(LightningCLI._parse_ckpt_path).parameters) == ["self"]


# --- ModelCheckpointSteps: ModelCheckpoint's private saving steps ------------------------------------------------


def test_model_checkpoint_steps_keep_their_signatures():
    expected = {
        "_should_skip_saving_checkpoint": ["self", "trainer"],
        "_save_checkpoint": ["self", "trainer", "filepath"],
        "_save_last_checkpoint": ["self", "trainer", "monitor_candidates"],
        "_monitor_candidates": ["self", "trainer"],
        "_link_checkpoint": ["trainer", "filepath", "linkpath"],
    }
    for name, parameters in expected.items():
        assert list(inspect.signature(getattr(ModelCheckpoint, name)).parameters) == parameters, name
    assert isinstance(inspect.getattr_static(ModelCheckpoint, "_link_checkpoint"), staticmethod)


class Recording(ModelCheckpointSteps):
    """Saves through ``ModelCheckpointSteps`` at every validation and records what Lightning did."""

    links: ClassVar[list[tuple[str, str]]] = []

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.skipped: list[tuple[int, bool, bool]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        before = self.skips_saving(trainer)
        if not before:
            self.save_to(trainer, os.path.join(str(self.dirpath), f"mine-{trainer.global_step}.ckpt"))
        self.skipped.append((trainer.global_step, before, self.skips_saving(trainer)))

    @staticmethod
    def link_last(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        Recording.links.append((os.path.basename(filepath), os.path.basename(linkpath)))
        ModelCheckpointSteps.link_last(trainer, filepath, linkpath)


def test_save_to_counts_as_this_callbacks_save_at_the_step(tmp_path):
    """``save_to`` records the step, so ``skips_saving`` turns true at that step (Lightning saves nothing twice)."""
    callback = Recording(dirpath=tmp_path, save_top_k=0)
    trainer(callbacks=(callback,)).fit(Regression(), loader(), loader())
    assert callback.skipped == [(2, False, True), (4, False, True)]
    assert sorted(os.listdir(tmp_path)) == ["mine-2.ckpt", "mine-4.ckpt"]


def test_skips_saving_outside_fit_and_during_the_sanity_check(tmp_path):
    callback = Recording(dirpath=tmp_path)
    fitted = trainer(callbacks=(callback,), num_sanity_val_steps=1)
    fitted.fit(Regression(), loader(), loader())
    fitted.validate(Regression(), loader(), verbose=False)
    assert [skipped for _, skipped, _ in callback.skipped] == [True, False, False, True], "sanity, 2, 4, validate"


def test_a_link_to_the_newest_checkpoint_goes_through_link_last(tmp_path):
    Recording.links.clear()
    callback = Recording(dirpath=tmp_path, save_last="link", every_n_train_steps=2, save_top_k=-1)
    trainer(callbacks=(callback,)).fit(Regression(), loader(), loader())
    assert ("epoch=0-step=4.ckpt", "last.ckpt") in Recording.links
    assert os.readlink(tmp_path / "last.ckpt") == "epoch=0-step=4.ckpt"


def test_save_new_last_versions_a_last_it_did_not_write(tmp_path):
    """``save_new_last`` picks ``last-v1.ckpt`` beside a ``last.ckpt`` of another run (AtomicModelCheckpoint relies
    on that to leave a folder's ``last.ckpt`` alone when the run does not own it)."""
    (tmp_path / "last.ckpt").write_text("another run's")

    class SaveNewLast(Recording):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.save_new_last(trainer)

    trainer(callbacks=(SaveNewLast(dirpath=tmp_path, save_last=True),)).fit(Regression(), loader(), loader())
    assert (tmp_path / "last.ckpt").read_text() == "another run's"
    assert torch.load(tmp_path / "last-v1.ckpt", weights_only=False)["global_step"] == 4


def test_lightning_still_keeps_last_at_the_best_step_only(tmp_path):
    """Why AtomicModelCheckpoint saves ``last`` itself: with ``save_top_k=1``, Lightning writes ``last`` only
    beside a new best, so a validation that is not one leaves ``last`` at an older step. When this fails,
    Lightning keeps ``last`` current itself and ``AtomicModelCheckpoint.save_last_if_behind`` can go."""

    class Worsening(Regression):
        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
            self.log("val", float(self.global_step))

    callback = ModelCheckpoint(dirpath=tmp_path, monitor="val", mode="min", save_top_k=1, save_last=True)
    trainer(callbacks=(callback,)).fit(Worsening(), loader(), loader())
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 2


class ValidatedStep(Regression):
    """Validates to the global step (2.0 at step 2, ...): a score names the weights it was measured on."""

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val", float(self.global_step))


def scores_of_the_saves(callback: ModelCheckpoint) -> dict[int, float]:
    """Step of each top-k file (named ``{step}``) -> the score the callback gave it."""
    return {int(Path(path).stem.split("=")[1]): float(score) for path, score in callback.best_k_models.items()}


def test_lightning_scores_a_periodic_save_before_an_interval_validation_with_the_previous_one(tmp_path):
    """Why ``defer_save_to_validation`` exists: a periodic save at a step that ``val_check_interval`` validates is
    made first, with the previous validation's value, and the validation then saves nothing. When this fails,
    Lightning defers by itself and AtomicModelCheckpoint.on_train_batch_end can go."""
    callback = ModelCheckpoint(dirpath=tmp_path, monitor="val", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer(callbacks=(callback,)).fit(ValidatedStep(), loader(), loader())
    assert scores_of_the_saves(callback) == {2: 2.0, 4: 2.0}


def test_a_deferred_save_is_made_by_the_validation_with_its_score(tmp_path):
    class Deferring(ModelCheckpointSteps):
        def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
            self.defer_save_to_validation()

    callback = Deferring(dirpath=tmp_path, monitor="val", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer(callbacks=(callback,)).fit(ValidatedStep(), loader(), loader())
    assert scores_of_the_saves(callback) == {2: 2.0, 4: 4.0}


class ValidationAhead(pl.Callback):
    def __init__(self) -> None:
        self.ahead: list[bool] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        self.ahead.append(validates_after_this_batch(trainer))


@pytest.mark.parametrize("accumulate, expected", [(1, [False, True, False, True]), (2, [False, False, False, True])])
def test_validates_after_this_batch_counts_the_batch_just_done(accumulate, expected):
    probe = ValidationAhead()
    interval = 2 * accumulate
    trainer(
        max_steps=4 // accumulate, callbacks=(probe,), val_check_interval=interval, accumulate_grad_batches=accumulate
    ).fit(Regression(), loader(), loader())
    assert probe.ahead == expected


def test_nothing_validates_after_a_batch_without_validation():
    probe = ValidationAhead()
    trainer(callbacks=(probe,)).fit(Regression(), loader())
    assert probe.ahead == [False] * 4


# --- make_every_rank_data_parallel: ModelParallelStrategy._data_parallel_size -------------------------------


def mesh_sizes(monkeypatch, strategy: ModelParallelStrategy, nodes: int, devices: int, prepare=None) -> tuple[int, int]:
    """The (data-parallel, tensor-parallel) sizes ``strategy.setup_environment`` builds its device mesh with, on
    ``nodes`` x ``devices`` processes, after ``prepare(strategy)`` (FSDP2Strategy's step before it)."""
    built = []
    monkeypatch.setattr(ModelParallelStrategy, "_setup_distributed", lambda self: None)
    monkeypatch.setattr(lightning_model_parallel, "_setup_device_mesh", lambda *args: built.append(args[:2]))
    strategy.num_nodes = nodes
    strategy.parallel_devices = [torch.device("cpu")] * devices
    strategy.accelerator = SimpleNamespace(setup_device=lambda device: None)
    strategy._lightning_module = SimpleNamespace()
    if prepare is not None:
        prepare(strategy)
    strategy.setup_environment()
    return built[0]


def test_model_parallel_auto_data_parallel_size_is_the_node_count(monkeypatch):
    """Why the private size is set: ``data_parallel_size="auto"`` means one data-parallel rank per node."""
    strategy = ModelParallelStrategy(tensor_parallel_size=1)
    assert mesh_sizes(monkeypatch, strategy, nodes=2, devices=3) == (2, 1)


def test_every_rank_is_data_parallel_in_the_mesh(monkeypatch):
    strategy = ModelParallelStrategy(tensor_parallel_size=1)
    assert mesh_sizes(monkeypatch, strategy, nodes=2, devices=3, prepare=make_every_rank_data_parallel) == (6, 1)


# --- mark_sigterm_received: Trainer._signal_connector.received_sigterm -------------------------------------------


class MarkAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if trainer.global_step == self.step:
            mark_sigterm_received(trainer)
            assert trainer.received_sigterm


def test_a_marked_sigterm_stops_the_fit_once_the_batch_is_complete():
    fitting = trainer(max_steps=8, callbacks=(MarkAt(step=3),))
    with pytest.raises(SIGTERMException):
        fitting.fit(Regression(), loader(), loader())
    assert fitting.global_step == 3
    assert fitting.fit_loop.epoch_loop.batch_progress.total.completed == 3


def test_a_marked_sigterm_runs_the_validation_that_was_due_first():
    """A mark at a step where validation is due stops after validating (a validation-time save includes it)."""
    fitting = trainer(max_steps=8, callbacks=(MarkAt(step=2),))
    with pytest.raises(SIGTERMException):
        fitting.fit(Regression(), loader(), loader())
    assert fitting.global_step == 2 and "val" in fitting.callback_metrics


SLURM_VARIABLES = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4711", "SLURM_PROCID": "0"}
"""What makes Lightning pick ``SLURMEnvironment`` (with ``auto_requeue``) for a Trainer: a SLURM batch task."""


class HandlersAtTrainStart(pl.Callback):
    """Records the SIGTERM and SIGUSR1 handlers in place while the fit loop runs."""

    def __init__(self) -> None:
        self.seen: dict[int, object] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}


class KeepHandlers(pl.Callback):
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        keep_signal_handlers(trainer)


def mine(signum: int, frame: object) -> None:
    """A program's own handler."""


def test_lightning_installs_its_sigterm_and_slurm_sigusr1_handlers_right_before_the_fit_loop(monkeypatch):
    """What ``keep_signal_handlers`` prevents: under SLURM's variables Lightning's signal connector replaces a
    program's SIGTERM handler (composing it after its own, which broadcasts) and installs its SIGUSR1 handler
    (``hpc_ckpt``) when the program has none, in ``register_signal_handlers``, after the ``setup`` hooks."""
    for name, value in SLURM_VARIABLES.items():
        monkeypatch.setenv(name, value)
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, mine),
        signal.SIGUSR1: signal.signal(signal.SIGUSR1, signal.SIG_DFL),
    }
    try:
        look = HandlersAtTrainStart()
        fitting = trainer(max_steps=1, callbacks=(look,))
        fitting.fit(Regression(), loader())
        connector = fitting._signal_connector
        assert look.seen[signal.SIGTERM] is not mine
        assert connector._sigterm_notifier_fn in look.seen[signal.SIGTERM].signal_handlers
        assert connector._slurm_sigusr_handler_fn in look.seen[signal.SIGUSR1].signal_handlers
        assert signal.getsignal(signal.SIGTERM) is mine, "restored at teardown"
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_keep_signal_handlers_leaves_the_programs_handlers_in_place_and_the_flag_working(monkeypatch):
    for name, value in SLURM_VARIABLES.items():
        monkeypatch.setenv(name, value)
    previous = {signum: signal.signal(signum, mine) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        look = HandlersAtTrainStart()
        fitting = trainer(max_steps=8, callbacks=(KeepHandlers(), look, MarkAt(step=3)))
        with pytest.raises(SIGTERMException):
            fitting.fit(Regression(), loader())
        assert look.seen == {signal.SIGTERM: mine, signal.SIGUSR1: mine}
        assert fitting.global_step == 3, "the flag mark_sigterm_received sets still stops the fit"
        assert not list(Path.cwd().rglob("hpc_ckpt_*.ckpt"))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- align_logging_step: the checkpoint's loop state ----------------------------------------------------------


class SaveAt(pl.Callback):
    """Saves ``<folder>/validation-<step>.ckpt`` after each validation and ``batch-<step>.ckpt`` at batch end."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.folder / f"validation-{trainer.global_step}.ckpt")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        trainer.save_checkpoint(self.folder / f"batch-{trainer.global_step}.ckpt")


class Steps(Logger):
    """Records the step of every ``log_metrics`` call."""

    name, version = "steps", 0

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if "train" in metrics:
            self.steps.append(step)

    def log_hyperparams(self, *args, **kwargs) -> None:
        """Nothing to record."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    trainer(max_steps=4, callbacks=(SaveAt(folder),), enable_checkpointing=False).fit(Regression(), loader(), loader())
    return folder


@pytest.mark.parametrize(("name", "completed"), [("validation-2.ckpt", 2), ("batch-2.ckpt", 1)])
def test_a_checkpoints_loop_state_holds_the_logging_step_before_the_batch_counts(saved, name, completed):
    """Where ``align_logging_step`` reads and writes: the logging step is saved one behind the optimizer step,
    and a save at batch end is one batch short of completed."""
    fit_loop = torch.load(saved / name, weights_only=False)["loops"]["fit_loop"]
    assert fit_loop[LOOP_STATE_KEY][LOGGING_STEP_KEY] == 1
    assert fit_loop[BATCH_PROGRESS_KEY]["total"]["processed"] == 2
    assert fit_loop[BATCH_PROGRESS_KEY]["total"]["completed"] == completed


class Aligned(Regression):
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        align_logging_step(checkpoint, self.trainer)


@pytest.mark.parametrize(("name", "first_step"), [("batch-2.ckpt", 2), ("batch-4.ckpt", 4), ("validation-2.ckpt", 2)])
def test_lightning_adds_the_missing_logging_step_back_on_restart(saved, name, first_step):
    """Lightning's restart adds back the step a batch-end save and a save at a validation that was due lack, so
    ``align_logging_step`` leaves such a checkpoint's count alone (a resume logs the next step once)."""
    steps = Steps()
    trainer(max_steps=6, logger=steps).fit(Aligned(), loader(), loader(), ckpt_path=saved / name)
    assert steps.steps[0] == first_step


def test_lightning_does_not_add_the_step_for_a_validation_that_was_not_due(saved):
    """A validation off the ``val_check_interval`` grid (mf's final one, asked for with ``should_stop``) is not
    run again on restart, so Lightning adds nothing: ``align_logging_step`` sets the count itself."""
    steps = Steps()
    # validation-4.ckpt was saved at a due validation of a grid of 2; a grid of 3 makes it one that was not due
    trainer(max_steps=6, logger=steps, val_check_interval=3).fit(
        Aligned(), loader(), loader(), ckpt_path=saved / "validation-4.ckpt"
    )
    assert steps.steps[0] == 4


# --- launched_processes: _SubprocessScriptLauncher.procs -------------------------------------------------------


def test_the_launcher_keeps_the_processes_it_starts_in_procs(monkeypatch):
    started = []

    def popen(command, env, cwd):
        started.append(SimpleNamespace(local_rank=env["LOCAL_RANK"]))
        return started[-1]

    monkeypatch.setattr(subprocess_script.subprocess, "Popen", popen)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    launcher = subprocess_script._SubprocessScriptLauncher(LightningEnvironment(), num_processes=3, num_nodes=1)
    launcher._call_children_scripts()
    assert [process.local_rank for process in started] == ["1", "2"]
    assert launched_processes(SimpleNamespace(strategy=SimpleNamespace(launcher=launcher))) == started
    assert launched_processes(SimpleNamespace(strategy=SimpleNamespace(launcher=None))) == []


# --- event_file_writer: torch's SummaryWriter._get_file_writer ---------------------------------------------------


def test_the_event_file_writer_writes_summaries_into_the_writers_folder_even_after_close(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    assert event_file_writer(writer).get_logdir() == str(tmp_path)
    writer.close()
    experiment, _, _ = hparams({"lr": 0.1}, {"val": 0.0})
    event_file_writer(writer).add_summary(experiment)
    writer.close()
    assert any(b"hparams" in path.read_bytes() for path in tmp_path.iterdir())


def test_lightnings_tensorboard_logger_writes_hparams_the_same_way():
    """The private call is the one Lightning's own ``log_hyperparams`` makes (so it changes with Lightning's)."""
    from lightning.fabric.loggers.tensorboard import TensorBoardLogger

    assert "self.experiment._get_file_writer()" in inspect.getsource(TensorBoardLogger.log_hyperparams)


def test_launched_processes_of_a_real_trainer_without_a_launcher_are_none():
    assert launched_processes(trainer()) == []


# --- PatientChildObserver: _launch_process_observer, _ChildProcessObserver._terminate_all ------------------------


def a_sleeping_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def a_failed_process() -> subprocess.Popen:
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    failed.wait()
    return failed


def test_the_subprocess_launcher_starts_its_observer_through_the_module_function():
    assert "_launch_process_observer(self.procs)" in inspect.getsource(
        subprocess_script._SubprocessScriptLauncher.launch
    )


def test_lightnings_observer_kills_the_launching_process_at_once_when_a_rank_died():
    """Why PatientChildObserver exists: the launching process gets no time to report the lost rank."""
    launching = a_sleeping_process()
    try:
        _ChildProcessObserver(main_pid=launching.pid, child_processes=[a_failed_process()])._run()
        assert launching.wait(timeout=10) == -signal.SIGKILL
    finally:
        launching.kill()


def test_observe_launched_ranks_patiently_replaces_the_launchers_observer(monkeypatch):
    monkeypatch.setattr(subprocess_script, "_launch_process_observer", subprocess_script._launch_process_observer)
    started = []
    monkeypatch.setattr(PatientChildObserver, "start", lambda observer: started.append(observer))
    observe_launched_ranks_patiently()
    subprocess_script._launch_process_observer([])
    assert [type(observer) for observer in started] == [PatientChildObserver]
    assert started[0]._main_pid == os.getpid()


def test_the_patient_observer_kills_only_after_the_grace(monkeypatch):
    monkeypatch.setattr(lightning_private, "OBSERVER_GRACE_SECONDS", 1.0)
    launching = a_sleeping_process()
    try:
        started = time.monotonic()
        PatientChildObserver(main_pid=launching.pid, child_processes=[a_failed_process()])._run()
        assert time.monotonic() - started >= 1.0
        assert launching.wait(timeout=10) == -signal.SIGKILL
    finally:
        launching.kill()
