"""MemoryFormer and the baseline Transformer behind one interface, with generation, FLOPs and save/load."""

from mf_lightning.models.architectures import MODELS, MemoryFormer, Transformer, build_model
from mf_lightning.models.base import DecoderLM
from mf_lightning.models.pretrained import load_pretrained, save_pretrained

__all__ = [
    "MODELS",
    "DecoderLM",
    "MemoryFormer",
    "Transformer",
    "build_model",
    "load_pretrained",
    "save_pretrained",
]
