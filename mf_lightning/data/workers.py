"""Tokenizing the parts of a corpus in worker processes, with each failure traced to its part.

``tokenize_parts`` starts ``workers`` processes (``python -m mf_lightning.data.workers``: a fresh
interpreter that imports only this module's needs, not the program that started it, so a worker of
``mf`` costs about 50 MB and a second to start rather than Lightning's and torch's import) and hands
each one part at a time over a pipe; each reads, encodes and writes its own part (``parts``) with the
tokenizer's own thread pool off, so that the processes share the cores without oversubscribing them.
Memory is bounded by one batch of documents per worker, whatever the corpus's size; the parent only
counts progress and never holds documents. With one worker, or one part, the parts are tokenized in
this process instead (no start-up cost, and the tokenizer may use its own threads).

A worker that fails reports its part and error; a worker that dies (the out-of-memory killer, a
signal) is noticed by the end of its pipe and its exit status. Either way the other workers are
stopped and the parts already finished stay on disk. A worker and this process report a failure
alike (``failure``, from the event ``error_event`` makes of it), in the terms of ``faults``: a part
file that could not be written is an ``OSError`` naming it and what to do, after which running the same
preparation again resumes, as it does after a killed worker; an error in the corpus names the part and
the error, without that hint, since a corrected corpus is tokenized anew. A worker whose parent is gone
stops too.
"""

from __future__ import annotations

import collections
import os
import pickle
import signal
import struct
import subprocess
import sys
import traceback
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, BinaryIO

from mf_lightning.data.faults import CacheWriteError, PreparationFailed, resume_hint, unwritable
from mf_lightning.data.parts import tokenize_part
from mf_lightning.data.progress import Progress
from mf_lightning.data.sources import Part, Source
from mf_lightning.data.tokenizers import Tokenizer
from mf_lightning.fs.errors import describe

POLL_SECONDS = 1.0
EXPECTED_ERRORS = (ValueError, OSError)
"""Errors of the input or the machine, reported by their message; anything else also by its traceback."""
HEADER = struct.Struct("<Q")
Event = tuple[Any, ...]
"""What a worker reports: ``("progress", position, documents)``, ``("done",)``, or a failure (``error_event``)."""


def tokenize_parts(
    source: Source, tokenizer: Tokenizer, parts: list[Part], folder: Path, workers: int, progress: Progress
) -> None:
    """Tokenizes ``parts`` into ``folder``, in ``workers`` processes (see the module), advancing ``progress``."""
    if workers <= 1 or len(parts) <= 1:
        tokenize_here(source, tokenizer, parts, folder, progress)
        return
    job = pickle.dumps((source, tokenizer, folder))  # once, whatever the number of workers
    pool = [Worker(job) for _ in range(min(workers, len(parts)))]
    try:
        follow(pool, collections.deque(parts), folder, progress)
    finally:
        for worker in pool:
            worker.stop()


def tokenize_here(source: Source, tokenizer: Tokenizer, parts: list[Part], folder: Path, progress: Progress) -> None:
    """Tokenizes ``parts`` one after the other in this process."""
    for done, part in enumerate(parts):
        reporter = Reporter(progress)
        try:
            tokenize_part(source, tokenizer, part, folder, reporter.report)
        except EXPECTED_ERRORS as error:
            raise failure(part, error_event(error), len(parts) - done, folder) from error
        progress.advance(part.size - reporter.position)


class Worker:
    """A worker process and the two pipes to it: parts go in, events come out (pickles behind a length)."""

    def __init__(self, job: bytes) -> None:
        parts_read, parts_write = os.pipe()
        events_read, events_write = os.pipe()
        environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(sys.path)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(parts_read), str(events_write)],
            pass_fds=(parts_read, events_write),
            env=environment,
        )
        os.close(parts_read)
        os.close(events_write)
        self.parts = os.fdopen(parts_write, "wb", buffering=0)
        self.events = os.fdopen(events_read, "rb", buffering=0)
        self.part: Part | None = None
        self.reported = 0
        send_pickled(self.parts, job)

    def assign(self, part: Part | None) -> None:
        """Hands ``part`` to the worker, or ``None`` to let it exit."""
        self.part, self.reported = part, 0
        try:  # noqa: SIM105
            send(self.parts, part)
        except BrokenPipeError:
            pass  # it died: its pipe's end tells ``follow``

    def death(self) -> str:
        """How the worker ended, once its pipe has closed."""
        status = self.process.wait()
        if status < 0:
            name = signal.Signals(-status).name
            likely = ", likely the out-of-memory killer," if -status == signal.SIGKILL else ""
            return f"was killed by {name}{likely}"
        return f"exited with status {status}"

    def stop(self) -> None:
        """Ends the process (at once if it still works) and closes the pipes."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.parts.close()
        self.events.close()


def follow(pool: list[Worker], pending: collections.deque[Part], folder: Path, progress: Progress) -> None:
    """Keeps every worker busy until no part is left; raises the error of the first failure (``failure``)."""
    for worker in pool:
        worker.assign(pending.popleft() if pending else None)
    while busy := {worker.events: worker for worker in pool if worker.part is not None}:
        for events in wait(list(busy), timeout=POLL_SECONDS):
            worker = busy[events]  # type: ignore[index]
            part = worker.part
            assert part is not None
            event = receive(worker.events)
            unfinished = len(pending) + len(busy)
            if event is None:
                what = f"a preparation worker (process {worker.process.pid}) {worker.death()} while tokenizing"
                raise PreparationFailed(f"{what} {part.describe()}; {resume_hint(unfinished, folder)}")
            kind, *details = event
            if kind == "progress":
                position, documents = details
                progress.advance(position - worker.reported, documents)
                worker.reported = position
            elif kind == "done":
                progress.advance(part.size - worker.reported)
                worker.assign(pending.popleft() if pending else None)
            else:
                raise failure(part, event, unfinished, folder)


def error_event(error: Exception) -> Event:
    """The event reporting ``error``, raised while tokenizing a part (see ``failure``)."""
    if isinstance(error, CacheWriteError):
        return ("unwritable", error.errno, error.strerror, error.filename)
    if isinstance(error, EXPECTED_ERRORS):
        return ("error", describe(error) if isinstance(error, OSError) else str(error))
    return ("crash", traceback.format_exc())


def failure(part: Part, event: Event, unfinished: int, folder: Path) -> Exception:
    """The error to raise for a failure ``event`` of ``part``, ``unfinished`` parts being left (see the module).

    A part file that could not be written is an ``OSError`` naming it, after which running again resumes;
    an error in the corpus is a ``PreparationFailed`` naming the part, without that hint (fixing the
    corpus changes its identity, so it is tokenized anew); an unexpected error keeps its traceback."""
    kind, *details = event
    if kind == "unwritable":
        code, reason, path = details
        return unwritable(code, reason, path, resume_hint(unfinished, folder))
    if kind == "error":
        return PreparationFailed(f"{part.describe()}: {details[0]}")
    return PreparationFailed(f"{part.describe()}: {details[0]}; {resume_hint(unfinished, folder)}")


class Reporter:
    """Turns a part's progress reports into ``Progress`` advances (in-process tokenization)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.position = 0

    def report(self, position: int, documents: int) -> None:
        self.progress.advance(position - self.position, documents)
        self.position = position


def send(pipe: BinaryIO, value: Any) -> None:
    """Writes ``value`` pickled, after its length."""
    send_pickled(pipe, pickle.dumps(value))


def send_pickled(pipe: BinaryIO, data: bytes) -> None:
    """Writes a pickle (``data``) after its length."""
    pipe.write(HEADER.pack(len(data)) + data)


def receive(pipe: BinaryIO) -> Any:
    """The next value written by ``send``, or ``None`` when the pipe has ended."""
    header = read_exactly(pipe, HEADER.size)
    if header is None:
        return None
    data = read_exactly(pipe, HEADER.unpack(header)[0])
    return None if data is None else pickle.loads(data)


def read_exactly(pipe: BinaryIO, size: int) -> bytes | None:
    """``size`` bytes from ``pipe``, or ``None`` if it ends first."""
    chunks, left = [], size
    while left:
        chunk = pipe.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def serve(parts_fd: int, events_fd: int) -> None:
    """A worker process: tokenizes the parts it is handed until it gets ``None`` or its parent is gone."""
    parent = os.getppid()
    with os.fdopen(parts_fd, "rb", buffering=0) as parts, os.fdopen(events_fd, "wb", buffering=0) as events:
        job = receive(parts)
        if job is None:
            return
        source, tokenizer, folder = job
        while (part := receive(parts)) is not None:

            def report(position: int, documents: int) -> None:
                if os.getppid() != parent:  # the parent was killed: stop rather than write parts nobody waits for
                    os._exit(1)
                send(events, ("progress", position, documents))

            try:
                tokenize_part(source, tokenizer, part, folder, report)
            except Exception as error:
                send(events, error_event(error))
                return
            send(events, ("done",))


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
