"""MemoryFormer and the baseline Transformer behind one interface, with generation, FLOPs and save/load."""

from mf_lightning.models.base import DecoderLM
from mf_lightning.models.memoryformer import MemoryFormer
from mf_lightning.models.pretrained import load_pretrained, save_pretrained
from mf_lightning.models.registry import MODELS, build_model
from mf_lightning.models.transformer import Transformer

__all__ = [
    "MODELS",
    "DecoderLM",
    "MemoryFormer",
    "Transformer",
    "build_model",
    "load_pretrained",
    "save_pretrained",
]
