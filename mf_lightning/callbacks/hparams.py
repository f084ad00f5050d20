"""``HParamsSummary``: a run's settings and headline metrics in TensorBoard's HParams tab, to compare runs.

TensorBoard's HParams table has one row per run: the hyper-parameters of the run's ``session start``
summary and, for each metric the ``experiment`` summary names, the **latest value of that scalar tag in
the run's folder**. So the summaries name the metrics (``loss/val``, ``val/bpb``, the used fraction of
table rows, ``loss/train``) and the table always shows their final values, read from the curves
themselves; no copy of a value is written that could disagree with them.

They are written at the start of every fit (rank 0), which makes the right thing happen in each case:

- a finished run: the last validation (after the final step) gives the final values, and the session
  end summary written when the fit completes marks it successful;
- a preempted or crashed run is already in the table with its latest values, and no end status;
- a resumed run writes to the same folder, where TensorBoard keeps the first summary of each tag: the
  row keeps the settings the run started with, the metrics come from the resumed curves (``mf`` makes
  sure its event file is read after the earlier ones: ``lit.event_files``), and the resumed fit's
  completion marks it successful.

``on_fit_start`` runs before Lightning's own ``log_hyperparams``, so with a ``TensorBoardLogger`` that
keeps its ``hp_metric`` default, the placeholder summary comes second and TensorBoard ignores it; ``mf``
turns the placeholder off anyway, since it also logs a meaningless ``hp_metric`` scalar (-1 at step 0).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from torch.utils.tensorboard.summary import hparams

from mf_lightning.callbacks.bucket_usage import model_usage_tag
from mf_lightning.callbacks.monitoring import tensorboard_writers
from mf_lightning.callbacks.run_tags import bits_per_byte_tags, loss_tags, usage_layers
from mf_lightning.callbacks.usage_metrics import USED_FRACTION
from mf_lightning.lit.lightning_private import event_file_writer

HParamValue = bool | int | float | str
SEED_VARIABLE = "PL_GLOBAL_SEED"
"""Where Lightning's ``seed_everything`` (``mf fit --seed_everything``) keeps the seed for subprocesses."""


class HParamsSummary(pl.Callback):
    """Writes ``run_settings`` and the ``comparison_metrics`` to every TensorBoard logger (see the module)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module, ending=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module, ending=True)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ending: bool) -> None:
        writers = tensorboard_writers(trainer) if trainer.is_global_zero else []
        if not writers:
            return
        # torch's summary only names the metric columns after the keys; TensorBoard reads the values from the curves
        metrics = dict.fromkeys(comparison_metrics(trainer, pl_module), 0.0)
        experiment, session_start, session_end = hparams(run_settings(trainer, pl_module), metrics)
        summaries = [session_end] if ending else [experiment, session_start]
        for writer in writers:
            file_writer = event_file_writer(writer)  # as TensorBoardLogger.log_hyperparams writes its summaries
            for summary in summaries:
                file_writer.add_summary(summary)


def comparison_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
    """Tags of the metrics the HParams table shows: the losses, validation bits per byte and used table rows."""
    used = [model_usage_tag(USED_FRACTION)] if usage_layers(trainer, pl_module) else []
    return loss_tags(trainer, pl_module) + bits_per_byte_tags(trainer, pl_module) + used


def run_settings(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, HParamValue]:
    """The model's and data's settings and the trainer's run length, precision and scale, flat and typed for HParams.

    ``model.*`` are the LightningModule's hyper-parameters with the resolved architecture (``config``,
    e.g. ``model.n_layer``, ``model.code_bits``) in place of the preset's ``overrides``; ``data.*`` the
    DataModule's; ``seed`` the global seed when one was set.
    """
    model = {key: value for key, value in pl_module.hparams.items() if not key.startswith("_")}
    config = getattr(pl_module, "config", None)
    if hasattr(config, "to_dict"):
        model.pop("overrides", None)
        model.update(config.to_dict())
    datamodule = getattr(trainer, "datamodule", None)
    data = {key: value for key, value in getattr(datamodule, "hparams", {}).items() if not key.startswith("_")}
    settings = {**flatten("model", model), **flatten("data", data)}
    settings.update(
        {
            "trainer.max_steps": trainer.max_steps,
            "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches,
            "trainer.precision": str(trainer.precision),
            "trainer.world_size": trainer.world_size,
            "trainer.gradient_clip_val": as_hparam(trainer.gradient_clip_val),
        }
    )
    if os.environ.get(SEED_VARIABLE):
        settings["seed"] = int(os.environ[SEED_VARIABLE])
    return settings


def flatten(prefix: str, values: Mapping[str, Any]) -> dict[str, HParamValue]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` under ``prefix`` -> ``{"prefix.a.b": 1, "prefix.c": "[1, 2]"}``."""
    flat: dict[str, HParamValue] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}"
        flat.update(flatten(name, value) if isinstance(value, Mapping) else {name: as_hparam(value)})
    return flat


def as_hparam(value: Any) -> HParamValue:
    """``value`` if HParams shows it as it is (a number or text), else its text (booleans, ``None``, lists, paths).

    Booleans become ``"True"``/``"False"``: torch's summary would store them as the numbers 1 and 0.
    """
    return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) else str(value)
