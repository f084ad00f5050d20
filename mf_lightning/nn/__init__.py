"""Neural-network modules: the Memory Layer and the attention and blocks built from it."""

from mf_lightning.nn.attention import CausalSelfAttention, KVCache
from mf_lightning.nn.blocks import MemoryBlock, TransformerBlock
from mf_lightning.nn.memory_layer import MemoryLayer
from mf_lightning.nn.rotary import apply_rotary, rotary_cos_sin

__all__ = [
    "CausalSelfAttention",
    "KVCache",
    "MemoryBlock",
    "MemoryLayer",
    "TransformerBlock",
    "apply_rotary",
    "rotary_cos_sin",
]
