"""Every private Lightning API ``mf_lightning`` relies on, in this one module.

Lightning (2.6) has no public way to do what each entry here does; each one's docstring says what it relies
on, why no public API covers it, and the upstream issue or pull request (or that there is none). The rest of
the package reaches these internals only through this module (``tests/test_architecture.py`` refuses a
private Lightning name anywhere else), and ``tests/lit/test_lightning_private.py`` holds one canary test per
entry, which fails as soon as Lightning changes the behaviour relied on. They are why ``pyproject.toml`` pins
``lightning<2.7``: to move the pin, run the canaries against the new release and fix what they name.
``docs/private-lightning-hooks.md`` has the table.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

LOOP_STATE_KEY = "epoch_loop.state_dict"
"""Where a checkpoint's ``loops.fit_loop`` keeps the training epoch loop's own state."""
LOGGING_STEP_KEY = "_batches_that_stepped"
"""The training epoch loop's logging step in that state (``_TrainingEpochLoop.on_save_checkpoint``)."""
BATCH_PROGRESS_KEY = "epoch_loop.batch_progress"
"""Where ``loops.fit_loop`` keeps the training batches' progress counters (``total.processed`` ...)."""


class ConfigOverCheckpointCLI(LightningCLI):
    """``LightningCLI`` that keeps the model's config as given when a ``--ckpt_path`` is passed.

    Since 2.5.5 (pull request #21116, for issues #20310 and #20801) LightningCLI's private ``_parse_ckpt_path``,
    called by ``__init__`` right after parsing, unpickles the checkpoint once more and overwrites the
    model's arguments with its stored hyper-parameters, so a changed config would silently train the
    checkpoint's model instead; ``LanguageModel.on_load_checkpoint`` refuses a checkpoint of another model
    instead. No public switch turns it off: the ``adapt_checkpoint_hparams`` hook proposed upstream
    (pull request #21408, open) would, by returning ``{}``, and then replaces this override.
    """

    def _parse_ckpt_path(self) -> None:
        """Leaves ``self.config`` as parsed (the checkpoint's hyper-parameters are not read)."""


class ModelCheckpointSteps(ModelCheckpoint):
    """``ModelCheckpoint`` with the private steps a subclass needs to save ``last`` itself, under public names.

    Lightning writes ``last`` only beside a new top-k or periodic file (documented: "whenever a checkpoint
    file gets saved"; issue #19325, closed as intended; pull request #21244 made it stricter), so a subclass
    that keeps ``last`` current calls the steps ``ModelCheckpoint`` uses itself; none of them is public
    (issue #4335 asks for the class to be split into overridable parts). ``save_last="link"`` links through
    the private static ``_link_checkpoint``, which deletes the old link before making the new one (no
    upstream issue about that gap); here it is handed to ``link_last``, which subclasses replace.
    """

    def skips_saving(self, trainer: pl.Trainer) -> bool:
        """Whether ``ModelCheckpoint`` would save nothing now: not fitting, a sanity check, ``fast_dev_run``,
        or this callback already saved at this global step (``_should_skip_saving_checkpoint``)."""
        return self._should_skip_saving_checkpoint(trainer)

    def save_to(self, trainer: pl.Trainer, filepath: str) -> None:
        """Saves the trainer's state to ``filepath`` as this callback's own save: it is recorded as the last
        saved step and file (which ``skips_saving`` and the next link read) and the loggers are told
        (``_save_checkpoint``)."""
        self._save_checkpoint(trainer, filepath)

    def save_new_last(self, trainer: pl.Trainer) -> None:
        """Saves ``last`` under the name ``ModelCheckpoint`` picks, versioned (``last-v1``) when a ``last`` it
        did not write exists (``_save_last_checkpoint`` with ``_monitor_candidates``)."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def defer_save_to_validation(self) -> None:
        """Leaves the save due at this training batch to the validation that follows it (which then saves top-k
        and ``last``, ``_defer_save_until_validation``). Lightning defers so itself only before the validation
        after an epoch's last batch, not before one that ``val_check_interval`` counted across epochs schedules
        (no upstream issue): its periodic save would score the new weights with the previous validation's value,
        and, being a save at this step, make the validation's own save skip."""
        self._defer_save_until_validation = True

    def _link_checkpoint(self, trainer: pl.Trainer, filepath: str, linkpath: str) -> None:  # type: ignore[override]
        """Lightning's step that points ``save_last="link"``'s ``last`` at ``filepath``: ``link_last`` does it."""
        self.link_last(trainer, filepath, linkpath)

    @staticmethod
    def link_last(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        """Points the link ``linkpath`` at ``filepath`` (on rank 0; every rank waits): Lightning's own way."""
        ModelCheckpoint._link_checkpoint(trainer, filepath, linkpath)


def make_every_rank_data_parallel(strategy: ModelParallelStrategy) -> None:
    """Sets ``strategy``'s data-parallel size to all its processes (``num_nodes x devices``), before its
    ``setup_environment`` builds the device mesh from it.

    ``ModelParallelStrategy(data_parallel_size=...)`` is fixed before the Trainer hands the strategy its
    devices, and its ``"auto"`` means the number of nodes (the GPUs of a node form the tensor-parallel
    group), so plain FSDP over every device of any run needs the private ``_data_parallel_size`` set at
    ``setup_environment``. No upstream issue asks for a "whole world" size.
    """
    strategy._data_parallel_size = strategy.num_nodes * strategy.num_processes


def mark_sigterm_received(trainer: pl.Trainer) -> None:
    """Makes ``trainer.received_sigterm`` true, so Lightning stops the fit with ``SIGTERMException`` once the
    current training batch is complete (after the first batch of a validation that was due).

    ``Trainer.received_sigterm`` is a read-only property of the private signal connector's flag, which only
    Lightning's own SIGTERM handler sets; that handler broadcasts from inside the signal handler of the rank
    that got the signal, which hangs a multi-rank job (issue #20806; the broadcast came with pull request
    #20825). No public way sets the flag at a step every rank agrees on.
    """
    trainer._signal_connector.received_sigterm = True


class HandsOffSignalConnector(_SignalConnector):
    """Lightning's signal connector without its signal handlers: the flag ``mark_sigterm_received`` sets is kept,
    and ``register_signal_handlers`` (called by ``Trainer._run`` right before the fit loop) installs nothing, so
    the handlers ``mf`` installed (``mf_lightning.lit.stop_signals``) stay in place.

    Lightning's connector installs a SIGTERM handler that broadcasts from inside the handler (a multi-rank hang,
    issue #20806) and, under SLURM with ``SLURMEnvironment(auto_requeue=True)`` (the default Lightning picks from
    SLURM's variables), a SIGUSR1 handler that saves ``hpc_ckpt_<n>.ckpt`` mid-step on every rank and requeues
    the job whether or not that save completed. ``SLURMEnvironment(auto_requeue=False)`` is public but only where
    the config names the plugin; no public switch leaves the handlers to the program (no upstream issue).
    """

    def register_signal_handlers(self) -> None:
        """Clears the flag for this run, and installs no handler."""
        self.received_sigterm = False
        self._original_handlers = {}


def keep_signal_handlers(trainer: pl.Trainer) -> None:
    """Makes ``trainer`` leave this process's signal handlers alone (``HandsOffSignalConnector``); called before its
    run registers handlers (at the latest from a callback's ``setup``)."""
    if not isinstance(trainer._signal_connector, HandsOffSignalConnector):
        trainer._signal_connector = HandsOffSignalConnector(trainer)


def align_logging_step(checkpoint: dict[str, Any], trainer: pl.Trainer | None) -> None:
    """Makes a fit that ``trainer`` resumes from ``checkpoint`` log at the checkpoint's optimizer step.

    Lightning saves the logging step (the loop state's private ``_batches_that_stepped``) before it counts
    the batch's step, and on restart adds that step back only where it replays the end of the batch: for a
    save before the batch completed (``on_train_batch_end``, e.g. ``every_n_train_steps``), and for one at a
    validation that its ``val_check_interval`` makes due at that batch. A save at a validation that was not
    due (mf's final one, asked for with ``should_stop`` off the grid) and a save after the count (SIGTERM)
    would resume one step early or late, logging every later scalar on top of values already logged.
    With one optimizer the logging step is the optimizer step, so the saved count is set to what Lightning's
    restart turns into it. Whether a validation is due is known when Lightning counts validations in
    batches across epochs (an ``int`` ``val_check_interval`` with ``check_val_every_n_epoch=None``, as ``mf``
    sets them); otherwise it is taken as not due. The checkpoint's loop state has no public reader or
    writer. Upstream: the logging step is restored since pull request #13467 (issue #12274); no issue covers
    these saves (issue #19367, open, is an off-by-one of the global step on a mid-epoch resume).
    """
    loops = checkpoint.get("loops") or {}
    fit_loop = loops.get("fit_loop") or {}
    epoch_loop = fit_loop.get(LOOP_STATE_KEY)
    if not isinstance(epoch_loop, dict) or LOGGING_STEP_KEY not in epoch_loop or "global_step" not in checkpoint:
        return
    total = (fit_loop.get(BATCH_PROGRESS_KEY) or {}).get("total") or {}
    saved_before_completion = total.get("completed") == total.get("processed", 0) - 1
    replayed = saved_before_completion or validation_due(trainer, total.get("ready", 0))
    epoch_loop[LOGGING_STEP_KEY] = checkpoint["global_step"] - int(replayed)


def validation_due(trainer: pl.Trainer | None, batches: int) -> bool:
    """Whether ``trainer`` validates after its ``batches``-th training batch, where that depends on the batch count
    alone (an ``int`` ``val_check_interval`` counted across epochs); False otherwise."""
    interval = getattr(trainer, "val_check_interval", None)
    across_epochs = trainer is not None and trainer.check_val_every_n_epoch is None
    return across_epochs and isinstance(interval, int) and batches > 0 and batches % interval == 0


def validates_after_this_batch(trainer: pl.Trainer) -> bool:
    """In ``on_train_batch_end``: whether a validation follows this training batch, by the interval counted across
    epochs (``validation_due`` of the batches done so far, ``fit_loop.epoch_loop.batch_progress``) or because the
    fit stops after it (``should_stop``: Lightning validates before it stops, ``ValidationSchedule``)."""
    if not trainer.enable_validation:
        return False
    return trainer.should_stop or validation_due(trainer, trainer.fit_loop.epoch_loop.batch_progress.total.ready)


def launched_processes(trainer: pl.Trainer) -> list[subprocess.Popen[Any]]:
    """The processes of the other ranks of this node that this process started (Lightning's subprocess
    launcher, on each node's rank 0), or none.

    ``procs`` is an attribute of the private ``_SubprocessScriptLauncher``; Lightning has no public way to
    reach the processes it launched. No upstream issue.
    """
    return list(getattr(trainer.strategy.launcher, "procs", None) or [])


OBSERVER_GRACE_SECONDS = 20.0
"""How long the launching process may take to end on its own after a rank it started died, before it is killed."""


class PatientChildObserver(_ChildProcessObserver):
    """Lightning's watch over the ranks its launcher started, which lets the launching rank end on its own first.

    Lightning's observer (a thread of the launching process, polling every 5 s) kills that process and every other
    rank with SIGKILL as soon as it sees a rank die. The launching rank's own collective has failed by then or
    fails a moment later, and it ends with the line naming the lost rank (``lost_ranks``) and its locks released;
    killed first (seen here: 2 runs of 10 on a loaded machine), it ends with no line at all. This observer waits
    ``OBSERVER_GRACE_SECONDS`` (the thread ends with the process) and only then kills, as Lightning does, what a
    collective that never fails (a hang) still keeps. ``_launch_process_observer`` and ``_terminate_all`` are
    private; no upstream issue.
    """

    def _terminate_all(self) -> None:
        deadline = time.monotonic() + OBSERVER_GRACE_SECONDS
        while time.monotonic() < deadline:
            time.sleep(0.1)
        super()._terminate_all()


def observe_launched_ranks_patiently() -> None:
    """Makes Lightning's subprocess launcher watch the ranks it starts with ``PatientChildObserver``."""
    subprocess_script._launch_process_observer = lambda processes: PatientChildObserver(
        main_pid=os.getpid(), child_processes=processes
    ).start()


def event_file_writer(writer: Any) -> Any:
    """The file writer of a TensorBoard ``SummaryWriter``, which takes ready-made ``Summary`` protos (the
    HParams plugin's), reopened if the writer was closed.

    torch's private ``SummaryWriter._get_file_writer``, called exactly as Lightning's own
    ``TensorBoardLogger.log_hyperparams`` does; torch has no public method that writes a given summary into
    the writer's folder (``add_hparams`` writes into a new sub-folder). No upstream issue.
    """
    return writer._get_file_writer()
