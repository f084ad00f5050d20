"""Neural-network modules: the Memory Layer and the attention (with rotary positions) and blocks built from it."""

from mf_lightning.nn.attention import CausalSelfAttention, KVCache, apply_rotary, rotary_cos_sin
from mf_lightning.nn.blocks import GPTNeoXBlock, MemoryBlock
from mf_lightning.nn.memory_layer import MemoryLayer

__all__ = [
    "CausalSelfAttention",
    "GPTNeoXBlock",
    "KVCache",
    "MemoryBlock",
    "MemoryLayer",
    "apply_rotary",
    "rotary_cos_sin",
]
