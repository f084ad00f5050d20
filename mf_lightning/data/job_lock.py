"""One builder per cached artefact across every process of a job, on one node or several sharing a file system.

Under DDP or FSDP every rank (and with several nodes, every node's first rank) asks for the same
tokenizer and token cache at about the same time. ``exclusive(path)`` lets one of them build: the lock
is a file created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFS) holding the
holder's host and process id, which a thread of the holder touches every ``HEARTBEAT_SECONDS``. The
others wait, logging whom they wait for, and when the lock is gone they check what was built instead
of building it again. A lock is stale, and is removed, when its process no longer runs on this host
(``staging.is_running``), or, for a holder on another host, when its modification time has not changed
for ``STALE_SECONDS`` of waiting (measured on the waiter's own clock, so clocks need not agree).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mf_lightning.data.staging import is_running

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
POLL_SECONDS = 0.5
WAIT_LOG_SECONDS = 60.0


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Holds the lock file ``path`` for the block, waiting while a live process elsewhere holds it (see the module)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wait_for(path, what)
    stop = threading.Event()

    def touch() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(path)
            except OSError:
                return

    thread = threading.Thread(target=touch, name="mf-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)


def wait_for(path: Path, what: str) -> None:
    """Creates the lock file, first waiting for (or removing a stale) one held by another process."""
    logged = 0.0
    seen: tuple[str, int] | None = None
    unchanged_since = time.monotonic()
    while True:
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, mtime = read_holder(path)
            if holder is None:
                continue  # released between the two calls
            if seen != (holder, mtime):
                seen, unchanged_since = (holder, mtime), time.monotonic()
            if is_stale(holder, time.monotonic() - unchanged_since):
                log.warning("removing the stale lock %s of %s (its builder stopped)", path, holder)
                path.unlink(missing_ok=True)
                continue
            now = time.monotonic()
            if now - logged >= WAIT_LOG_SECONDS:
                log.info("waiting for %s, which builds %s (lock %s)", holder, what, path)
                logged = now
            time.sleep(POLL_SECONDS)
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(holder_name())
        return


def holder_name() -> str:
    """``"process <pid> on <host>"`` for this process."""
    return f"process {os.getpid()} on {socket.gethostname()}"


def read_holder(path: Path) -> tuple[str | None, int]:
    """The holder written in the lock file and the file's modification time; ``None`` when it is gone."""
    try:
        return path.read_text(encoding="utf-8"), path.stat().st_mtime_ns
    except FileNotFoundError:
        return None, 0


def is_stale(holder: str, unchanged_seconds: float) -> bool:
    """Whether the holder stopped: a dead process of this host, or no heartbeat for ``STALE_SECONDS``."""
    words = holder.split()
    if len(words) == 4 and words[2] == "on" and words[3] == socket.gethostname() and words[1].isdigit():
        return not is_running(int(words[1]))
    return unchanged_seconds >= STALE_SECONDS
