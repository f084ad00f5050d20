"""One run per folder: ``mf fit`` claims its run folder with a lock file before it writes anything there.

Without a claim, two runs started at once in one fresh folder both pass the "folder holds no
checkpoints" check and then mix their checkpoints, configs and event files. The claim is the lock file
``.mf-fit.lock`` (``mf_lightning.fs.lock``: created atomically, kept alive by a heartbeat, taken over
when its holder is gone — at once on this host, after ``STALE_SECONDS`` without a heartbeat for another
host's). A live holder is refused at once, not waited for.
"""

from __future__ import annotations

from pathlib import Path

from mf_lightning.fs.lock import FileLock, LockHeld

LOCK_NAME = ".mf-fit.lock"


class RunFolderInUse(ValueError):
    """Another ``mf fit`` holds the folder's lock."""


def claim_run_folder(folder: Path) -> FileLock:
    """The held lock of ``folder`` for this process; ``RunFolderInUse`` naming the holder if a live run has it."""
    lock = FileLock(Path(folder) / LOCK_NAME, f"the run folder {folder}")
    try:
        return lock.acquire(wait=0)
    except LockHeld as error:
        raise RunFolderInUse(
            f"{folder} is in use by another mf fit ({error.holder.describe()}); one run per folder: "
            "wait for it to end or use another --trainer.default_root_dir (if that process is gone, delete "
            f"{lock.path})"
        ) from error
