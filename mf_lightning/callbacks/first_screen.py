"""What ``mf fit`` shows first: progress in optimizer steps and tokens, and a summary with real FLOPs.

Lightning's bar counts the batches of the current epoch and reads ``Epoch 0/-2`` in a run bounded by
``max_steps`` (ours are; their epochs are only the sampler's); its model summary measures FLOPs by
running ``example_input_array``, which a language model has none of, so it prints ``Total FLOPs: 0``.
Off a terminal (a log file, a batch job, a pipe) a bar is one mangled line at the end, so the progress is
plain log lines instead.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count

from mf_lightning.checks import non_negative_number
from mf_lightning.data.progress import LOG_EVERY_S, LineClock, on_terminal
from mf_lightning.lit.module import LOSS, TRAIN, metric_tag

log = logging.getLogger(__name__)


class StepProgressBar(RichProgressBar):
    """Progress: a bar on a terminal, else one log line every ``log_every_s`` seconds (0: every step or batch).

    On a terminal the training bar runs over the whole run's optimizer steps, described as
    ``Step s/total · N tokens``. When stdout or stderr is not a terminal, no bar is drawn: every
    ``log_every_s`` seconds (and at the last step) one log line says
    ``train: step 120/8000 · 15.7 M tokens · loss 3.21 · 52.1 K tokens/s · ETA 12 min``,
    and validation and testing log ``validation: batch 30/200 · ETA 1 min`` the same way (``LogLines``).
    """

    tokens_per_step: int | None = None

    def __init__(self, log_every_s: float = LOG_EVERY_S) -> None:
        """``log_every_s``: seconds between two progress lines when the output is not a terminal (0: every step)."""
        super().__init__()
        self.log_every_s = non_negative_number("progress.log_every_s", log_every_s)
        self.lines: LogLines | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not on_terminal():
            self.disable()
            self.lines = LogLines(self.log_every_s) if trainer.is_global_zero else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.lines is not None:
            self.lines.start(trainer.global_step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        if self.lines is not None:
            self.lines.start_evaluation()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        if self.lines is not None:
            self.lines.start_evaluation()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.lines is not None and not trainer.sanity_checking:
            self.lines.evaluation("validation", batch_idx + 1, trainer.num_val_batches[dataloader_idx])

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.lines is not None:
            self.lines.evaluation("test", batch_idx + 1, trainer.num_test_batches[dataloader_idx])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.show_steps(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.tokens_per_step = batch[0].numel() * trainer.accumulate_grad_batches * trainer.world_size
        self.show_steps(trainer)
        if self.lines is not None:
            loss = trainer.callback_metrics.get(metric_tag(TRAIN, LOSS))
            self.lines.training(
                trainer.global_step,
                trainer.estimated_stepping_batches,
                self.tokens_per_step,
                None if loss is None else float(loss),
            )

    def show_steps(self, trainer: pl.Trainer) -> None:
        """Sets the training bar to the optimizer steps done of all the run's, and the tokens trained on."""
        if self.progress is None or self.train_progress_bar_id is None:
            return
        total = trainer.estimated_stepping_batches
        self.progress.update(
            self.train_progress_bar_id,
            total=total,
            completed=trainer.global_step,
            description=step_description(trainer.global_step, total, self.tokens_per_step),
        )
        self.refresh()


def step_description(step: int, total: float, tokens_per_step: int | None) -> str:
    """``Step 120/8000 · 15.7 B tokens`` (no token count before the first batch has shown its size)."""
    description = f"Step {step}/{total:g}"
    if tokens_per_step is not None:
        description += f" · {count(step * tokens_per_step)} tokens"
    return description


def count(number: int) -> str:
    """``number`` as ``512``, ``15.7 K`` or ``3.2 B`` (Lightning's human-readable count, without its padding)."""
    return get_human_readable_count(number).strip()


class LogLines:
    """Progress as one log line every ``seconds``: training in optimizer steps, evaluation in batches."""

    def __init__(self, seconds: float) -> None:
        self.clock = LineClock(seconds)
        self.started = self.evaluation_started = time.monotonic()
        self.first_step = 0

    def start(self, step: int) -> None:
        """Training starts (or resumes) at optimizer step ``step``."""
        self.clock.restart()
        self.started = time.monotonic()
        self.first_step = step

    def start_evaluation(self) -> None:
        self.evaluation_started = time.monotonic()

    def training(self, step: int, total: float, tokens_per_step: int, loss: float | None) -> None:
        """Logs ``train: step s/total · tokens · loss · tokens/s · ETA`` when due."""
        if not self.clock.due(step >= total):
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        steps_per_s = (step - self.first_step) / elapsed
        parts = [f"train: step {step}/{total:g}", f"{count(step * tokens_per_step)} tokens"]
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        parts.append(f"{count(round(steps_per_s * tokens_per_step))} tokens/s")
        parts.append(f"ETA {eta(total - step, steps_per_s)}")
        log.info(" · ".join(parts))

    def evaluation(self, name: str, batch: int, total: float) -> None:
        """Logs ``<name>: batch b/total · ETA`` when due."""
        if not self.clock.due(batch >= total):
            return
        rate = batch / max(time.monotonic() - self.evaluation_started, 1e-9)
        log.info(f"{name}: batch {batch}/{total:g} · ETA {eta(total - batch, rate)}")


def eta(remaining: float, per_second: float) -> str:
    """``remaining`` units at ``per_second`` as ``42 s``, ``12 min`` or ``3.5 h`` (``?`` before any progress)."""
    if per_second <= 0 or remaining == float("inf"):
        return "?"
    seconds = max(remaining, 0) / per_second
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class FlopsModelSummary(RichModelSummary):
    """Rich model summary whose FLOPs line is the model's training FLOPs per optimizer step.

    The figure is ``LanguageModel.flops_per_batch`` (from ``flops_per_token``: forward and backward,
    SPEC §3) times the micro-batches of one step on all devices; without it no FLOPs line is printed.
    Lightning's per-layer FLOPs column, all zeros here, is left out.
    """

    flops_per_step: int | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flops_per_batch = getattr(pl_module, "flops_per_batch", None)
        if flops_per_batch:
            self.flops_per_step = flops_per_batch * trainer.accumulate_grad_batches * trainer.world_size
        super().on_fit_start(trainer, pl_module)

    def summarize(
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in ("Params", "Params per Device") else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        lines = [
            f"[bold]Trainable params[/]: {get_human_readable_count(trainable_parameters)}",
            f"[bold]Non-trainable params[/]: {get_human_readable_count(total_parameters - trainable_parameters)}",
            f"[bold]Total params[/]: {get_human_readable_count(total_parameters)}",
            f"[bold]Total estimated model params size (MB)[/]: {get_formatted_model_size(model_size)}",
            f"[bold]Modules in train / eval mode[/]: {total_training_modes['train']} / {total_training_modes['eval']}",
        ]
        if self.flops_per_step:
            lines.append(f"[bold]Training FLOPs per optimizer step[/]: {get_human_readable_count(self.flops_per_step)}")
        console = get_console()
        console.print(table)
        console.print("\n".join(lines))
