"""The HParams table of ``mf fit`` runs, computed by TensorBoard's own HParams backend from the event files."""

import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
from cli_support import FrozenClock, run, scalars, tiny_run_args, write_corpus
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.plugin_event_accumulator import (
    EventAccumulator,
)
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import (
    api_pb2,
    backend_context,
    list_session_groups,
    metadata,
)
from tensorboard.summary.writer import event_file_writer as tensorboard_event_file_writer

from mf_lightning.callbacks import BucketUsageMonitor, HParamsSummary
from mf_lightning.callbacks.hparams import flatten
from mf_lightning.lit import event_files

METRICS = {"loss/val", "val/bpb", "memory_usage/used_fraction", "loss/train"}


def hparams_table(log_dir: Path) -> list[api_pb2.SessionGroup]:
    """The rows TensorBoard's HParams tab shows for the runs under ``log_dir``."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(log_dir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(log_dir))
    tensorboard = base_plugin.TBContext(logdir=str(log_dir), multiplexer=multiplexer, data_provider=provider)
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0,
        slice_size=100,
        allowed_statuses=[
            api_pb2.STATUS_UNKNOWN,
            api_pb2.STATUS_SUCCESS,
            api_pb2.STATUS_FAILURE,
            api_pb2.STATUS_RUNNING,
        ],
    )
    handler = list_session_groups.Handler(context.RequestContext(), backend_context.Context(tensorboard), "", request)
    return list(handler.run().session_groups)


def settings_of(group: api_pb2.SessionGroup) -> dict[str, object]:
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in group.hparams.items()}


def test_table_shows_the_run_settings_and_its_final_metrics(mf_fit_run) -> None:
    (group,) = hparams_table(mf_fit_run / "tensorboard")
    metrics = {value.name.tag: (value.training_step, value.value) for value in group.metric_values}
    logged = scalars(mf_fit_run / "tensorboard")
    assert set(metrics) == METRICS
    for tag, step_and_value in metrics.items():
        assert step_and_value == pytest.approx(logged[tag][-1]), f"{tag} is not the final value"
    assert metrics["loss/val"][0] == max(step for step, _ in logged["loss/train"]), "validated after the final step"

    settings = settings_of(group)
    expected = {
        "model.arch": "memoryformer",
        "model.n_layer": 2,
        "model.code_bits": 8,
        "model.max_seq_len": 64,
        "model.lr": 3e-3,
        "model.hash_centering": "False",
        "data.seq_len": 32,
        "data.batch_size": 4,
        "data.tokenizer": "byte",
        "trainer.max_steps": 6,
        "seed": 1234,
    }
    assert {name: settings.get(name) for name in expected} == pytest.approx(expected)
    assert not any(name.startswith("model.overrides") for name in settings), "overrides are in the resolved config"
    assert [session.status for session in group.sessions] == [api_pb2.STATUS_SUCCESS]
    assert "hp_metric" not in logged, "no placeholder metric"


@pytest.fixture
def same_second(monkeypatch) -> None:
    """Every event file is created in the same second, by writers 9, 10, ... of this process.

    TensorBoard reads a run folder's event files in name order, ``events.out.tfevents.<second>.<host>.<pid>.<n>``
    with ``n`` counting this process's writers as text: ``...9`` sorts after ``...10``. Under ``pytest -n 2`` a
    worker's two fits of a test often start in one second, and its writer count is wherever earlier tests left it.
    """
    clock = FrozenClock(float(int(time.time())))
    for module in (tensorboard_event_file_writer, event_files):
        monkeypatch.setattr(module, "time", clock)
    monkeypatch.setattr(tensorboard_event_file_writer, "_global_uid", tensorboard_event_file_writer.AtomicCounter(9))


def resume_a_run(tmp_path: Path) -> None:
    """``mf fit`` for 3 steps, then resumed from ``last`` up to 6 steps, in the same run folder."""
    corpus = write_corpus(tmp_path / "corpus")
    run("fit", tiny_run_args(tmp_path, corpus, max_steps=3))
    run("fit", [*tiny_run_args(tmp_path, corpus, max_steps=6), "--ckpt_path", "last"])


@pytest.mark.slow
@pytest.mark.parametrize("clock", ["real", "same second"])
def test_resumed_run_keeps_its_row_and_shows_the_resumed_metrics(tmp_path, request, clock) -> None:
    if clock == "same second":
        request.getfixturevalue("same_second")
    resume_a_run(tmp_path)
    (group,) = hparams_table(tmp_path / "tensorboard")
    metrics = {value.name.tag: value.training_step for value in group.metric_values}
    assert metrics["loss/val"] == max(step for step, _ in scalars(tmp_path / "tensorboard")["loss/train"]) >= 5
    assert settings_of(group)["trainer.max_steps"] == 3, "TensorBoard keeps the settings a run started with"
    assert group.sessions[0].status == api_pb2.STATUS_SUCCESS


class Interrupt(Exception):
    """Stands for a preemption or a crash."""


class InterruptAtSecondStep(pl.Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == 1:
            raise Interrupt


def test_interrupted_fit_is_in_the_table_without_an_end_status(tiny_module, fit, tmp_path) -> None:
    with pytest.raises(Interrupt):
        fit(tiny_module, [HParamsSummary(), InterruptAtSecondStep()], max_steps=4)
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    events.Reload()
    assert set(events.PluginTagToContent(metadata.PLUGIN_NAME)) == {
        metadata.EXPERIMENT_TAG,
        metadata.SESSION_START_INFO_TAG,
    }


def test_settings_are_flat_and_typed_for_the_table() -> None:
    nested = {"lr": 0.1, "betas": (0.9, 0.95), "compile": False, "top_p": None, "overrides": {"code_bits": 4}}
    assert flatten("model", nested) == {
        "model.lr": 0.1,
        "model.betas": "(0.9, 0.95)",
        "model.compile": "False",
        "model.top_p": "None",
        "model.overrides.code_bits": 4,
    }


def test_summary_comes_before_lightnings_hp_metric_placeholder(tiny_module, fit, tmp_path) -> None:
    """The fixture's ``TensorBoardLogger`` keeps ``default_hp_metric=True``: its placeholder must not win."""
    tiny_module.save_hyperparameters({"hidden_tables": 4})  # Lightning writes its placeholder for modules with some
    fit(tiny_module, [HParamsSummary(), BucketUsageMonitor(log_every_n_steps=1, image_every_n_steps=2)], max_steps=2)
    (group,) = hparams_table(tmp_path / "tb")
    assert [value.name.tag for value in group.metric_values] == ["memory_usage/used_fraction"]
    assert settings_of(group)["model.hidden_tables"] == 4
