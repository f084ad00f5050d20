"""Generated documents for data tests (a module of its own, importable from tests and spawned workers)."""

import random

WORDS = [
    "the",
    "a",
    "memory",
    "layer",
    "hashes",
    "every",
    "token",
    "into",
    "tables",
    "of",
    "rows",
    "while",
    "attention",
    "mixes",
    "them",
    "über",
    "café",
]


def make_documents(count: int, words_per_document: int = 60, seed: int = 0) -> list[str]:
    """``count`` documents of random sentences over a small vocabulary (with some non-ASCII words)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_document)) + ".\n" for _ in range(count)]
