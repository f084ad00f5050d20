"""A clone of the repository is all it needs: no file reads the project's shared folder beside the checkout."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = re.compile(
    r"\.\./shared\b|/work/shared\b|\.parent\s*/\s*[\"']shared[\"']|parents\[\d\]\s*/\s*[\"']shared[\"']"
)
"""The ways a path to the shared folder beside the checkout is spelled: relative, absolute, or built from ``REPO``."""
RECORDS = "benchmarks/results/"
"""Measured results name the command that produced them, as it was run; they are records, never read."""


GENERATED = {".git", ".venv", ".whl", ".mf_cache", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints", "__pycache__"}
GENERATED |= {"runs", "lightning_logs", "build", "dist"}
"""Folders git, the tools and the project's own runs and builds write (all ignored by git), never the project's."""


def repository_files() -> list[Path]:
    """Every file of the checkout (``.ci/`` included), less generated folders and the measured results."""
    files = []
    for folder, subfolders, names in os.walk(REPO):
        subfolders[:] = [name for name in subfolders if name not in GENERATED]
        subfolders[:] = [name for name in subfolders if not name.endswith(".egg-info")]
        files += [Path(folder) / name for name in names]
    return [path for path in files if not path.relative_to(REPO).as_posix().startswith(RECORDS)]


def test_no_file_refers_to_the_shared_folder_beside_the_checkout() -> None:
    offenders = []
    for path in repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary files (images)
        offenders += [
            f"{path.relative_to(REPO)}:{number}"
            for number, line in enumerate(text.splitlines(), 1)
            if SHARED.search(line) and path != Path(__file__)
        ]
    assert not offenders, f"these lines refer to ../shared, which a clone does not have: {offenders}"


def test_the_pattern_finds_each_spelling() -> None:
    spellings = [
        '"../shared/corpora/x"',
        "/work/shared/SPEC.md",
        'REPO.parent / "shared" / "c"',
        "parents[1] / 'shared'",
    ]
    assert all(SHARED.search(spelling) for spelling in spellings)
    assert not SHARED.search("shared by every run")
