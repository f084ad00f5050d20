"""Run lm-evaluation-harness tasks on a model: task lookup (local YAML folders first), offline errors, seeds.

Indexing the harness's own task library takes tens of seconds, so when every requested task is defined
in ``include_path`` only those folders are indexed. A task whose dataset cannot be downloaded (no
network, unknown dataset) stops with one error naming the task and what to do, instead of the
``datasets`` library's retries and traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mf_lightning.data.tokenizers import Tokenizer
from mf_lightning.eval import missing_extra
from mf_lightning.eval.adapter import HarnessLM
from mf_lightning.models.base import DecoderLM

try:
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager
except ModuleNotFoundError as error:
    raise missing_extra(error) from error


def evaluate(
    model: DecoderLM,
    tokenizer: Tokenizer,
    tasks: Sequence[str],
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 1,
    include_path: Sequence[str | Path] = (),
    seed: int = 0,
) -> dict[str, Any]:
    """The harness's results dict (``results``, ``n-shot``, ``config``, ...) of ``model`` on ``tasks``.

    ``limit`` caps the examples per task (a fraction when < 1); ``seed`` seeds Python, NumPy, torch and
    the few-shot sampler.
    """
    for folder in include_path:
        if not Path(folder).is_dir():
            raise NotADirectoryError(f"--include_path {folder} is not a folder of task YAML files")
    manager = task_manager(tasks, [str(folder) for folder in include_path])
    try:
        return simple_evaluate(
            HarnessLM(model, tokenizer, batch_size=batch_size),
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            task_manager=manager,
            log_samples=False,
        )
    except ConnectionError as error:
        raise FileNotFoundError(
            f"the data of task(s) {', '.join(tasks)} could not be fetched ({error}); the harness downloads "
            "it from the Hugging Face Hub once, so run with network access first (it is then cached under "
            "~/.cache/huggingface), or define a local task with dataset_path: json in --include_path"
        ) from error


def task_manager(tasks: Sequence[str], include_path: list[str]) -> TaskManager:
    """A TaskManager that knows ``tasks``: the ``include_path`` folders alone when they define them all."""
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = TaskManager(include_path=include_path or None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown task(s) {', '.join(unknown)}: not an lm-eval task, group or tag"
            + (f" nor defined in {', '.join(include_path)}" if include_path else "")
            + " (`lm-eval ls tasks` lists them; local tasks need --include_path FOLDER)"
        )
    return manager
