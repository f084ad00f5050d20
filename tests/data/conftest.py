"""A small generated corpus: a folder of a few short plain-text documents (a few KB in all)."""

import random
from pathlib import Path

import pytest

WORDS = "the a memory layer hashes every token into tables of rows while attention mixes them über café".split()


def make_documents(count: int, words_per_document: int = 60, seed: int = 0) -> list[str]:
    """``count`` documents of random sentences over a small vocabulary (with some non-ASCII words)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_document)) + ".\n" for _ in range(count)]


@pytest.fixture
def documents() -> list[str]:
    return make_documents(12)


@pytest.fixture
def corpus_dir(tmp_path: Path, documents: list[str]) -> Path:
    """``documents`` as files doc00.txt .. doc11.txt in sorted order."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for index, text in enumerate(documents):
        (folder / f"doc{index:02d}.txt").write_text(text, encoding="utf-8")
    return folder
