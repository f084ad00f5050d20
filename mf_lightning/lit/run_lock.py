"""One run per folder: ``mf fit`` claims its run folder with a lock file before it writes anything there.

Without a claim, two runs started at once in one fresh folder both pass the "folder holds no
checkpoints" check and then mix their checkpoints, configs and event files. The claim is a file
``.mf-fit.lock`` holding the claimer's host and process id, created atomically (written under a
unique name and hard-linked into place, which fails if the lock exists), so exactly one of two
simultaneous claimers gets it. A lock whose process no longer runs on this host (a run killed
outright) is stale and taken over, as staging folders are (``mf_lightning.data.staging``); a lock of
another host cannot be checked from here and is respected.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Self

from mf_lightning.data.staging import is_running

LOCK_NAME = ".mf-fit.lock"


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
        for _ in range(3):  # a stale lock is taken over at most twice before giving up (claimers racing for it)
            if self.create():
                return
            holder = self.read_holder()
            if holder is None:
                continue  # released in between
            if not self.is_stale(holder):
                raise self.in_use(holder)
            self.remove_stale(holder)
        raise self.in_use(self.read_holder())

    def create(self) -> bool:
        """Atomically creates the lock holding ``self.holder``; False if a lock exists."""
        staged = self.path.with_name(f"{LOCK_NAME}.{secrets.token_hex(6)}.partial")
        staged.write_text(self.holder + "\n")
        try:
            os.link(staged, self.path)
        except FileExistsError:
            return False
        finally:
            staged.unlink()
        return True

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

    def remove_stale(self, holder: str) -> None:
        """Removes the lock if it still names ``holder``: it is renamed aside first, so of several claimers
        taking over one stale lock only one removes it, and a fresh lock renamed by mistake is put back."""
        aside = self.path.with_name(f"{LOCK_NAME}.{secrets.token_hex(6)}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text().strip() != holder:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink()

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
