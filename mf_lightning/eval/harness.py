"""Run lm-evaluation-harness tasks on a model: task lookup (local YAML folders first), offline errors, seeds.

Indexing the harness's own task library takes tens of seconds, so when every requested task is defined
in ``include_path`` only those folders are indexed. A task whose dataset cannot be downloaded (no
network, unknown dataset) stops with one error naming the task and what to do, instead of the
``datasets`` library's retries and traceback; when the Hub cannot be reached (a connection attempt of at
most ``HUB_CHECK_SECONDS``), the tasks run offline (``offline_when_unreachable``), so cached data is used at
once and missing data fails at once, instead of after 40 s of retries.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mf_lightning.data.tokenizers import Tokenizer
from mf_lightning.eval import missing_extra
from mf_lightning.eval.adapter import HarnessLM
from mf_lightning.models.base import DecoderLM

try:
    import datasets
    import huggingface_hub
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager
except ModuleNotFoundError as error:
    raise missing_extra(error) from error

HUB_CHECK_SECONDS = 3.0
"""The longest the connection attempt that tells whether the Hugging Face Hub is reachable may take."""
OFFLINE_VARIABLE = "HF_HUB_OFFLINE"


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
        with offline_when_unreachable():
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


def hub_reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the Hub's ``endpoint`` (a URL) opens within ``HUB_CHECK_SECONDS``."""
    url = urlsplit(endpoint)
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "", port), timeout=HUB_CHECK_SECONDS).close()
    except OSError:
        return False
    return True


@contextmanager
def offline_when_unreachable() -> Iterator[None]:
    """Runs the block with the Hub libraries offline (``HF_HUB_OFFLINE``) when the Hub cannot be reached and
    they are not offline already; restores their settings after it."""
    if huggingface_hub.constants.HF_HUB_OFFLINE or hub_reachable(huggingface_hub.constants.ENDPOINT):
        yield
        return
    saved = os.environ.get(OFFLINE_VARIABLE), huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    os.environ[OFFLINE_VARIABLE] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop(OFFLINE_VARIABLE, None)
        else:
            os.environ[OFFLINE_VARIABLE] = saved[0]
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved[1], saved[2]


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
