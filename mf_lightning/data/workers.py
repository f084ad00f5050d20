"""Tokenizing the parts of a corpus in worker processes, with each failure traced to its part.

``tokenize_parts`` starts ``workers`` processes (``spawn``: nothing of the parent's threads or state is
inherited) that take parts from a queue, each reading, encoding and writing its own (``parts``), with
the tokenizer's own thread pool off so that the processes share the cores without oversubscribing
them. Memory is bounded by one batch of documents per worker, whatever the corpus's size. The parent
only counts progress; it never holds documents. With one worker, or one part, the parts are tokenized
in this process instead (no start-up cost, and the tokenizer may use its own threads).

A worker that fails reports its part and error; a worker that dies (the out-of-memory killer, a
signal) is noticed by its exit status. Either way the other workers are stopped and the error names
the part; the parts already finished stay on disk, so running the same preparation again resumes.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import traceback
from pathlib import Path
from typing import Any

from mf_lightning.data.parts import tokenize_part
from mf_lightning.data.progress import Progress
from mf_lightning.data.sources import Part, Source
from mf_lightning.data.tokenizers import Tokenizer
from mf_lightning.storage_errors import ENVIRONMENT_ERRNOS, describe

POLL_SECONDS = 1.0
EXPECTED_ERRORS = (ValueError, OSError)
"""Errors of the input or the machine, reported by their message; anything else also by its traceback."""


class PreparationFailed(ValueError):
    """A part could not be tokenized (bad input, a vanished file, a killed worker); finished parts are kept.

    A ``ValueError`` so that ``mf`` reports it in one line: what to fix is the input or the machine."""


def tokenize_parts(
    source: Source, tokenizer: Tokenizer, parts: list[Part], folder: Path, workers: int, progress: Progress
) -> None:
    """Tokenizes ``parts`` into ``folder``, in ``workers`` processes (see the module), advancing ``progress``."""
    if workers <= 1 or len(parts) <= 1:
        for done, part in enumerate(parts):
            reporter = Reporter(progress)
            try:
                tokenize_part(source, tokenizer, part, folder, reporter.report)
            except EXPECTED_ERRORS as error:
                if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
                    raise
                hint = resume_hint(len(parts) - done, folder)
                raise PreparationFailed(f"{part.describe()}: {message(error)}; {hint}") from error
            progress.advance(part.size - reporter.position)
        return
    context = multiprocessing.get_context("spawn")
    tasks: Any = context.SimpleQueue()
    events: Any = context.Queue()
    for part in parts:
        tasks.put(part)
    count = min(workers, len(parts))
    for _ in range(count):
        tasks.put(None)
    processes = [
        context.Process(target=work, args=(source, tokenizer, folder, tasks, events), daemon=True) for _ in range(count)
    ]
    for process in processes:
        process.start()
    try:
        follow(processes, events, {part.index: part for part in parts}, folder, progress)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()


def follow(
    processes: list[Any], events: Any, parts: dict[int, Part], folder: Path, progress: Progress
) -> None:
    """Consumes the workers' events until every part is done; raises ``PreparationFailed`` on the first failure."""
    remaining = set(parts)
    current: dict[int, int] = {}
    reported: dict[int, int] = {}
    while remaining:
        try:
            kind, pid, index, *details = events.get(timeout=POLL_SECONDS)
        except queue.Empty:
            check_alive(processes, current, parts, len(remaining), folder)
            continue
        if kind == "start":
            current[pid] = index
        elif kind == "progress":
            position, documents = details
            progress.advance(position - reported.get(index, 0), documents)
            reported[index] = position
        elif kind == "done":
            progress.advance(parts[index].size - reported.pop(index, 0))
            remaining.discard(index)
            current.pop(pid, None)
        else:
            raise PreparationFailed(f"{parts[index].describe()}: {details[0]}; {resume_hint(len(remaining), folder)}")


def check_alive(processes: list[Any], current: dict[int, int], parts: dict[int, Part], remaining: int, folder: Path) -> None:
    """Raises naming the part a dead worker was tokenizing, or saying that every worker is gone."""
    for process in processes:
        if process.exitcode is None or process.exitcode == 0:
            continue
        if process.exitcode < 0:
            name = signal.Signals(-process.exitcode).name
            likely = ", likely the out-of-memory killer," if -process.exitcode == signal.SIGKILL else ""
            how = f"was killed by {name}{likely}"
        else:
            how = f"exited with status {process.exitcode}"
        index = current.get(process.pid)
        what = f"while tokenizing {parts[index].describe()}" if index is not None else "between parts"
        raise PreparationFailed(f"a preparation worker (process {process.pid}) {how} {what}; {resume_hint(remaining, folder)}")
    if all(process.exitcode is not None for process in processes):
        raise PreparationFailed(f"every preparation worker stopped before the work was done; {resume_hint(remaining, folder)}")


def message(error: BaseException) -> str:
    """An expected error's text, naming the file of an ``OSError``."""
    return describe(error) if isinstance(error, OSError) else str(error)


def resume_hint(remaining: int, folder: Path) -> str:
    """What was kept and how to go on."""
    return f"{remaining} part(s) unfinished; the finished ones are kept in {folder}: run the same preparation again to resume"


class Reporter:
    """Turns a part's progress reports into ``Progress`` advances (in-process tokenization)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.position = 0

    def report(self, position: int, documents: int) -> None:
        self.progress.advance(position - self.position, documents)
        self.position = position


def work(source: Source, tokenizer: Tokenizer, folder: Path, tasks: Any, events: Any) -> None:
    """A worker process: tokenizes parts from ``tasks`` until it takes ``None``, reporting on ``events``."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pid, parent = os.getpid(), os.getppid()
    while (part := tasks.get()) is not None:
        events.put(("start", pid, part.index))

        def report(position: int, documents: int, index: int = part.index) -> None:
            if os.getppid() != parent:  # the parent was killed: stop rather than write parts nobody waits for
                os._exit(1)
            events.put(("progress", pid, index, position, documents))

        try:
            tokenize_part(source, tokenizer, part, folder, report)
        except Exception as error:
            events.put(("error", pid, part.index, message(error) if isinstance(error, EXPECTED_ERRORS) else traceback.format_exc()))
            return
        events.put(("done", pid, part.index))
