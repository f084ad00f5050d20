"""Tokenizers for tests of worker processes; in a module of their own so that spawned workers can import them."""

from __future__ import annotations

import os
import signal
import time

from mf_lightning.data.tokenizers import ByteTokenizer

KILL_MARK = "KILL-THIS-WORKER"


class SlowByteTokenizer(ByteTokenizer):
    """The byte tokenizer (same fingerprint, so the same cache) taking 20 ms a batch: a build long enough to interrupt."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        time.sleep(0.02)
        return super().encode_batch(texts)


class KillingByteTokenizer(ByteTokenizer):
    """Kills its own process with SIGKILL at a document holding ``KILL_MARK``, as the out-of-memory killer would."""

    fingerprint = "killing-byte"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if any(KILL_MARK in text for text in texts):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode_batch(texts)
