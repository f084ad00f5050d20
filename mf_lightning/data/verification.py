"""Checking every chunk of an opened token cache in the background while training starts.

Opening a cache checks its manifest, sizes and a sample of chunks at once (``cache``); a byte changed
elsewhere (bit rot, a tool that restores modification times) would pass that. ``FullCheck`` then reads
every chunk against its CRC-32 in a thread (file reads and CRC-32 release the GIL, so training barely
notices), at about the speed of reading the files. If a chunk differs, the cache's manifest is removed,
so that the next run rebuilds it, and the run fails: the training loader raises at its next batch, and
``wait`` (called when the stage ends) raises if the check ends after the last batch.
"""

from __future__ import annotations

import logging
import threading

from mf_lightning.data.cache import MANIFEST, SPLITS, TokenCache, content_problem

log = logging.getLogger(__name__)


class DamagedCache(ValueError):
    """A token cache found damaged while in use; its manifest is gone, so the next run rebuilds it."""


class FullCheck:
    """Checks every chunk of ``cache`` in a daemon thread (see the module)."""

    def __init__(self, cache: TokenCache) -> None:
        self.cache = cache
        self.problem: str | None = None
        self.thread = threading.Thread(target=self.run, name="mf-cache-check", daemon=True)
        self.thread.start()

    def run(self) -> None:
        for split in SPLITS:
            problem = content_problem(self.cache, split, full=True)
            if problem is not None:
                try:
                    (self.cache.directory / MANIFEST).unlink(missing_ok=True)
                except OSError as error:  # a read-only cache: the next run's full check finds the damage again
                    log.warning(
                        "cannot remove the manifest of the damaged token cache %s: %s", self.cache.directory, error
                    )
                log.error("token cache %s is damaged: %s", self.cache.directory, problem)
                self.problem = problem
                return

    def raise_if_damaged(self) -> None:
        """Raises ``DamagedCache`` if the check has found a damaged chunk (so far)."""
        if self.problem is not None:
            raise DamagedCache(
                f"token cache {self.cache.directory} is damaged ({self.problem}); what this run trained on is not the "
                "corpus, so do not use its checkpoints. The cache is marked for rebuilding: run again"
            )

    def wait(self) -> None:
        """Waits for the check to finish; raises ``DamagedCache`` if it found a damaged chunk."""
        self.thread.join()
        self.raise_if_damaged()
