"""Model classes by ``ModelConfig.arch``, and ``build_model`` to instantiate one from a config."""

from __future__ import annotations

from mf_lightning.config import ModelConfig
from mf_lightning.models.base import DecoderLM
from mf_lightning.models.memoryformer import MemoryFormer
from mf_lightning.models.transformer import Transformer

MODELS: dict[str, type[DecoderLM]] = {cls.arch: cls for cls in (MemoryFormer, Transformer)}


def build_model(config: ModelConfig) -> DecoderLM:
    """The model ``config.arch`` names, built from ``config`` (on the current default device)."""
    if config.arch not in MODELS:
        raise ValueError(f"unknown arch {config.arch!r}; valid: {', '.join(MODELS)}")
    return MODELS[config.arch](config)
