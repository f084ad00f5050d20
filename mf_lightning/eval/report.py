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
        lines.append(f"| {row.task} | {row.metric} | {number(row.value)} | {stderr} |")
    average = average_accuracy(rows)
    if average is not None:
        count = sum(row.metric == AVERAGED_METRIC for row in rows)
        lines.append(f"| **average** ({count} tasks) | {AVERAGED_METRIC} | {average:.4f} | |")
    return "\n".join(lines)


def comparison_table(results: dict[str, dict[str, Any]]) -> str:
    """The paper's Table 1 layout: one row per task, one ``acc`` column per model (named by the keys), then the average."""
    accuracies = {
        name: {row.task: row.value for row in result_rows(result) if row.metric == AVERAGED_METRIC}
        for name, result in results.items()
    }
    tasks = list(dict.fromkeys(task for values in accuracies.values() for task in values))
    lines = ["| task | " + " | ".join(accuracies) + " |", "|---|" + "---:|" * len(accuracies)]
    for task in tasks:
        cells = (f"{values[task]:.4f}" if task in values else "" for values in accuracies.values())
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    averages = (f"{sum(values.values()) / len(values):.4f}" if values else "" for values in accuracies.values())
    lines.append(f"| **average** ({AVERAGED_METRIC}) | " + " | ".join(averages) + " |")
    return "\n".join(lines)


def read_json(path: str | Path) -> dict[str, Any]:
    """A results JSON written by ``mf eval`` (or lm-eval itself)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist; give JSON files written by mf eval")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"results file {path} is not valid JSON: {error}") from error
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise ValueError(f"results file {path} has no 'results' mapping; give JSON files written by mf eval")
    return results


def number(value: float) -> str:
    """Four decimals, or four significant digits for large values (word perplexities of untrained models)."""
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    """The harness's results dict as JSON at ``path`` (a ``.json`` file, or a folder to put ``results.json`` in)."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / "results.json"
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")
    return path


def task_tag(task: str, metric: str) -> str:
    """The TensorBoard tag of a task's score, ``tasks/<task>/<metric>`` (``tasks/average/acc`` for the mean).

    The group ``tasks`` sorts after ``loss`` and ``lr-AdamW``, so a run's TensorBoard still opens on its loss
    (see ``mf_lightning.lit.module.metric_tag``).
    """
    return f"tasks/{task}/{metric}"


def log_to_tensorboard(rows: list[Row], log_dir: str | Path, step: int) -> None:
    """``task_tag`` scalars of every row (and of the average accuracy) at ``step`` in the TensorBoard folder ``log_dir``."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for row in rows:
            writer.add_scalar(task_tag(row.task, row.metric), row.value, step)
        average = average_accuracy(rows)
        if average is not None:
            writer.add_scalar(task_tag("average", AVERAGED_METRIC), average, step)
