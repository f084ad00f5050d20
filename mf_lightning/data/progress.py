"""Progress of the long preparation steps (reading text, training a BPE, tokenizing), on a terminal or not.

On a terminal ``Progress`` draws a ``tqdm`` bar with rate and ETA; anywhere else (a log file, a batch
job, a pipe) it logs one line every ``PROGRESS_SECONDS`` with the same numbers, so a long step never
runs silently. ``Heartbeat`` logs how long a step with no measurable progress (the merge phase of BPE
training, which runs in Rust) has been running.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 10.0


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
        self.started = self.last = time.monotonic()
        self.first = done
        self.bar = None
        if on_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=action, unit=unit, unit_scale=True, dynamic_ncols=True)

    def advance(self, amount: int, documents: int = 0) -> None:
        """Adds ``amount`` units and ``documents`` documents."""
        self.done += amount
        self.documents += documents
        if self.bar is not None:
            self.bar.update(amount)
            return
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            log.info("%s: %s", self.action, self.summary(now))

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
        if self.bar is not None:
            self.bar.close()


class Heartbeat:
    """Logs ``"<action> (<n> s)"`` every ``seconds`` (default ``PROGRESS_SECONDS``) from ``start`` to ``stop``."""

    def __init__(self, action: str, seconds: float | None = None) -> None:
        self.action = action
        self.interval = PROGRESS_SECONDS if seconds is None else seconds
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
