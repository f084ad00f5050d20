"""What ``mf eval`` shows and keeps: a table like the paper's Table 1, the harness JSON, TensorBoard scalars.

The harness reports each metric as ``"<metric>,<filter>"`` with its standard error beside it as
``"<metric>_stderr,<filter>"``. The table lists every task and metric; its average is over the tasks'
accuracies (``acc``, the paper's Table 1 metric), the number the paper compares (0.375 for Pythia-70M,
0.404 for MemoryFormer-tiny).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AVERAGED_METRIC = "acc"
STDERR_SUFFIX = "_stderr"


@dataclass(frozen=True)
class Row:
    """One task's value of one metric and its standard error (None when the harness gives none)."""

    task: str
    metric: str
    value: float
    stderr: float | None


def result_rows(results: dict[str, Any]) -> list[Row]:
    """The numeric metrics of every task in the harness's ``results`` dict, in its order."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith(STDERR_SUFFIX) or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}{STDERR_SUFFIX},{filter_name}")
            name = metric if filter_name == "none" else f"{metric} ({filter_name})"
            rows.append(Row(task, name, float(value), float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


def average_accuracy(rows: list[Row]) -> float | None:
    """Mean ``acc`` over the tasks that report it (the paper's average), or None when none does."""
    values = [row.value for row in rows if row.metric == AVERAGED_METRIC]
    return sum(values) / len(values) if values else None


def format_table(rows: list[Row]) -> str:
    """A markdown table: task, metric, value, stderr, then the average accuracy."""
    lines = ["| task | metric | value | stderr |", "|---|---|---:|---:|"]
    for row in rows:
        stderr = "" if row.stderr is None or math.isnan(row.stderr) else f"{row.stderr:.4f}"
        lines.append(f"| {row.task} | {row.metric} | {row.value:.4f} | {stderr} |")
    average = average_accuracy(rows)
    if average is not None:
        count = sum(row.metric == AVERAGED_METRIC for row in rows)
        lines.append(f"| **average** ({count} tasks) | {AVERAGED_METRIC} | {average:.4f} | |")
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    """The harness's results dict as JSON at ``path`` (a ``.json`` file, or a folder to put ``results.json`` in)."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / "results.json"
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")
    return path


def log_to_tensorboard(rows: list[Row], log_dir: str | Path, step: int) -> None:
    """``eval/<task>/<metric>`` scalars (and ``eval/average/acc``) at ``step`` in the TensorBoard folder ``log_dir``."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for row in rows:
            writer.add_scalar(f"eval/{row.task}/{row.metric}", row.value, step)
        average = average_accuracy(rows)
        if average is not None:
            writer.add_scalar(f"eval/average/{AVERAGED_METRIC}", average, step)
