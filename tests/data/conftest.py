"""A small generated corpus: a folder of a few short plain-text documents (a few KB in all)."""

from pathlib import Path

import pytest
from corpus_support import make_documents


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
