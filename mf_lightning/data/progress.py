"""Progress of the long steps (reading text, training a BPE, tokenizing; and training), on a terminal or not.

On a terminal ``Progress`` draws a ``tqdm`` bar with rate and ETA; anywhere else (a log file, a batch
job, a pipe) it logs a line with the same numbers whenever one is due (``LineClock``: one every
``progress.log_every_s`` seconds, 0 for one per unit of progress) and a last one when it closes, so a
long step never runs silently. ``Heartbeat`` logs how long a step with no measurable progress (the merge
phase of BPE training, which runs in Rust) has been running. ``mf`` sets the interval of a run from its
config's ``progress.log_every_s`` (``lines_every``), the one ``StepProgressBar`` uses for training.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0
"""Seconds between two progress lines off a terminal, unless ``lines_every`` says otherwise (``progress.log_every_s``)."""
HEARTBEAT_S = 1.0
"""A ``Heartbeat``'s interval where lines are due at every unit of progress (0): it has no units to follow."""
INTERVAL: ContextVar[float] = ContextVar("mf_progress_interval", default=LOG_EVERY_S)


@contextmanager
def lines_every(seconds: float) -> Iterator[None]:
    """Within the block, progress created off a terminal logs a line every ``seconds`` (0: at every unit of
    progress); ``seconds`` is a checked number >= 0 (``checks.non_negative_number``)."""
    token = INTERVAL.set(seconds)
    try:
        yield
    finally:
        INTERVAL.reset(token)


class LineClock:
    """Whether a progress line is due: one every ``seconds`` (default: the ``lines_every`` interval), the last always."""

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = INTERVAL.get() if seconds is None else seconds
        self.last = time.monotonic()

    def restart(self) -> None:
        """Counts the next interval from now (a step that starts anew)."""
        self.last = time.monotonic()

    def due(self, last: bool = False) -> bool:
        """Whether a line is due now, ``last`` (the final step or unit) always getting one; if so, counts from now."""
        now = time.monotonic()
        if not last and now - self.last < self.seconds:
            return False
        self.last = now
        return True


def on_terminal() -> bool:
    """Whether stdout and stderr are both interactive terminals (a closed or replaced stream is not): with either
    one redirected to a file, the output is a log that a bar would only mangle."""
    return all(
        stream is not None and hasattr(stream, "isatty") and stream.isatty() for stream in (sys.stdout, sys.stderr)
    )


class Progress:
    """Counts ``done`` of ``total`` units (bytes, or rows) and documents, and shows them (see the module)."""

    def __init__(self, action: str, total: int | None, done: int = 0, unit: str = "B") -> None:
        self.action = action
        self.total = total
        self.done = done
        self.unit = unit
        self.documents = 0
        self.started = time.monotonic()
        self.first = done
        self.bar = None
        self.lines: LineClock | None = None
        self.logged: tuple[int, int] | None = None  # the counts the last line showed
        if on_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=action, unit=unit, unit_scale=True, dynamic_ncols=True)
        else:
            self.lines = LineClock()

    def advance(self, amount: int, documents: int = 0) -> None:
        """Adds ``amount`` units and ``documents`` documents."""
        self.done += amount
        self.documents += documents
        if self.bar is not None:
            self.bar.update(amount)
        elif self.lines is not None and not self.shown() and self.lines.due():
            self.log_line()

    def shown(self) -> bool:
        """Whether the last line showed the counts reached (no line for no progress)."""
        return self.logged == (self.done, self.documents)

    def log_line(self) -> None:
        """Logs ``"<action>: <summary>"``."""
        self.logged = (self.done, self.documents)
        log.info("%s: %s", self.action, self.summary(time.monotonic()))

    def summary(self, now: float) -> str:
        """``"45% (120.0 of 256.0 MB), 12.3 MB/s, 3000 documents, 10 s left"`` (what is knowable of it)."""
        elapsed = max(now - self.started, 1e-9)
        rate = (self.done - self.first) / elapsed
        scale, name = (1e6, f"M{self.unit}") if self.unit == "B" else (1, self.unit)
        text = f"{self.done / scale:.1f} {name}"
        if self.total:
            text = f"{100 * self.done / self.total:.0f}% ({self.done / scale:.1f} of {self.total / scale:.1f} {name})"
        text += f", {rate / scale:.1f} {name}/s, {self.documents} documents, {elapsed:.0f} s"
        if self.total and rate > 0:
            text += f", about {(self.total - self.done) / rate:.0f} s left"
        return text

    def close(self) -> None:
        """Ends the bar, or logs the last line (where none has shown the counts reached yet)."""
        if self.bar is not None:
            self.bar.close()
        elif not self.shown():
            self.log_line()


class Heartbeat:
    """Logs ``"<action> (<n> s)"`` every ``seconds`` (default: the ``lines_every`` interval, ``HEARTBEAT_S`` where
    that is 0) from ``start`` to ``stop``."""

    def __init__(self, action: str, seconds: float | None = None) -> None:
        self.action = action
        self.interval = (INTERVAL.get() or HEARTBEAT_S) if seconds is None else seconds
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.beat, name="mf-progress", daemon=True)
        self.started = time.monotonic()

    def start(self) -> None:
        self.started = time.monotonic()
        self.thread.start()

    def beat(self) -> None:
        while not self.stopped.wait(self.interval):
            log.info("%s (%.0f s)", self.action, time.monotonic() - self.started)

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
