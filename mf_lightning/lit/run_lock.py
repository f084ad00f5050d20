"""One run per folder: ``mf fit`` claims its run folder with a lock file before it writes anything there.

Without a claim, two runs started at once in one fresh folder both pass the "folder holds no
checkpoints" check and then mix their checkpoints, configs and event files. The claim is a file
``.mf-fit.lock`` holding the claimer's host and process id, created atomically (written under a
unique name and hard-linked into place, which fails if the lock exists), so exactly one of two
simultaneous claimers gets it. A lock whose process no longer runs on this host (a run killed
outright) is stale and taken over, as staging folders are (``mf_lightning.data.staging``); a lock of
another host cannot be checked from here and is respected. Of several claimers taking over one stale
lock, only the one holding a short-lived guard file (``.mf-fit.lock.takeover``, created the same way)
removes it, after checking it still names the dead process, so a fresh lock is never removed.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path
from typing import Self

from mf_lightning.data.staging import is_running

LOCK_NAME = ".mf-fit.lock"
CLAIM_ATTEMPTS = 500
"""How often a claimer retries while another one takes over a stale lock (10 ms apart)."""
ABANDONED_GUARD_SECONDS = 10.0
"""Age after which a takeover guard counts as left by a claimer killed while holding it."""


class RunFolderInUse(ValueError):
    """Another ``mf fit`` holds the folder's lock."""


class RunFolderLock:
    """The claim of one run folder by this process; ``release`` (or leaving a ``with`` block) gives it up."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.holder = f"{socket.gethostname()} {os.getpid()}"
        self.claim()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def claim(self) -> None:
        """Creates the lock file, taking over a stale one; raises ``RunFolderInUse`` if a live run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = None
        for _ in range(CLAIM_ATTEMPTS):
            if create_holding(self.path, self.holder):
                return
            holder = self.read_holder()
            if holder is not None and not self.is_stale(holder):
                raise self.in_use(holder)
            if holder is not None and not self.remove_stale(holder):
                time.sleep(0.01)  # another claimer is taking the stale lock over
        raise self.in_use(holder)

    def read_holder(self) -> str | None:
        """``"host pid"`` of the lock's holder, or None when there is no lock."""
        try:
            return self.path.read_text().strip()
        except FileNotFoundError:
            return None

    @staticmethod
    def is_stale(holder: str) -> bool:
        """Whether ``holder`` is a process of this host that no longer runs."""
        host, _, pid = holder.rpartition(" ")
        return host == socket.gethostname() and pid.isdigit() and not is_running(int(pid))

    def remove_stale(self, holder: str) -> bool:
        """Removes the lock if it still names ``holder``, under the takeover guard; False if another claimer
        holds the guard."""
        guard = self.path.with_name(f"{LOCK_NAME}.takeover")
        if not create_holding(guard, self.holder):
            try:
                if time.time() - guard.stat().st_mtime > ABANDONED_GUARD_SECONDS:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False
        try:
            if self.read_holder() == holder:
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)
        return True

    def in_use(self, holder: str | None) -> RunFolderInUse:
        host, _, pid = (holder or "").rpartition(" ")
        who = f" (process {pid} on host {host})" if host else ""
        return RunFolderInUse(
            f"{self.path.parent} is in use by another mf fit{who}; one run per folder: "
            "wait for it to end or use another --trainer.default_root_dir (if that process is gone, delete "
            f"{self.path})"
        )

    def release(self) -> None:
        """Removes the lock if this process still holds it."""
        if self.read_holder() == self.holder:
            self.path.unlink(missing_ok=True)


def create_holding(path: Path, holder: str) -> bool:
    """Atomically creates ``path`` holding the line ``holder`` (written under a unique name, then hard-linked
    into place); False if ``path`` exists."""
    staged = path.with_name(f"{path.name}.{secrets.token_hex(6)}.partial")
    staged.write_text(holder + "\n")
    try:
        os.link(staged, path)
    except FileExistsError:
        return False
    finally:
        staged.unlink()
    return True
