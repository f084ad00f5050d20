"""What ``mf fit`` shows first: a progress bar in optimizer steps and tokens, and a summary with real FLOPs.

Lightning's bar counts the batches of the current epoch and reads ``Epoch 0/-2`` in a run bounded by
``max_steps`` (ours are; their epochs are only the sampler's); its model summary measures FLOPs by
running ``example_input_array``, which a language model has none of, so it prints ``Total FLOPs: 0``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count


class StepProgressBar(RichProgressBar):
    """The training bar runs over the whole run's optimizer steps, described as ``Step s/total · N tokens``."""

    tokens_per_step: int | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.show_steps(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.tokens_per_step = batch[0].numel() * trainer.accumulate_grad_batches * trainer.world_size
        self.show_steps(trainer)

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
        description += f" · {get_human_readable_count(step * tokens_per_step)} tokens"
    return description


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
