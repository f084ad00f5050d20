"""A clone of the repository is all it needs: no file reads the project's shared folder beside the checkout."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = re.compile(
    r"\.\./shared\b|/work/shared\b|\.parent\s*/\s*[\"']shared[\"']|parents\[\d\]\s*/\s*[\"']shared[\"']"
)
"""The ways a path to the shared folder beside the checkout is spelled: relative, absolute, or built from ``REPO``."""
RECORDS = "benchmarks/results/"
"""Measured results name the command that produced them, as it was run; they are records, never read."""


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / name for name in listed.decode().split("\0") if name and not name.startswith(RECORDS)]


def test_no_file_refers_to_the_shared_folder_beside_the_checkout() -> None:
    offenders = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary files (images), or a file deleted in the work tree and not yet committed
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
