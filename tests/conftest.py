"""Test setup: triton runs under its CPU interpreter when no GPU is present (set before any import)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("MF_TEST_CUDA") == "1" else "1")

import pathlib

import pytest
import torch

REAL_PROSE = pathlib.Path(__file__).resolve().parent / "corpus" / "frankenstein_pg84.txt"


@pytest.fixture
def real_prose_path() -> pathlib.Path:
    """Real English prose nobody on this project wrote: a public-domain novel committed with the tests."""
    return REAL_PROSE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
