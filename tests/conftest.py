"""Test setup: triton runs under its CPU interpreter when no GPU is present (set before any import)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("MF_TEST_CUDA") == "1" else "1")

import pathlib

import pytest
import torch

CORPORA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "corpora"


@pytest.fixture
def fortunes_path() -> pathlib.Path:
    """Real English prose from ../shared/corpora; the test is skipped where that folder is absent."""
    path = CORPORA / "fortunes.txt"
    if not path.is_file():
        pytest.skip(f"shared corpus not found at {path} (only present beside the project checkout)")
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
