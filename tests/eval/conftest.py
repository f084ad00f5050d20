"""A small random MemoryFormer, the byte tokenizer, and a fixture running in the repository root (no download)."""

from pathlib import Path

import pytest
import torch
from eval_support import REPO

from mf_lightning.config import ModelConfig
from mf_lightning.data.tokenizers import ByteTokenizer
from mf_lightning.models import build_model
from mf_lightning.models.base import DecoderLM


@pytest.fixture
def model() -> DecoderLM:
    """A random debug MemoryFormer with a short context (32 tokens), so windows and truncation happen."""
    torch.manual_seed(0)
    return build_model(ModelConfig.from_preset("debug", arch="memoryformer", max_seq_len=32)).eval()


@pytest.fixture
def long_model() -> DecoderLM:
    """A random debug MemoryFormer whose 256-token context holds each local test document whole."""
    torch.manual_seed(0)
    return build_model(ModelConfig.from_preset("debug", arch="memoryformer", max_seq_len=256)).eval()


@pytest.fixture
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Runs the test in the repository root, where the local tasks' data_files paths point."""
    monkeypatch.chdir(REPO)
    return REPO
