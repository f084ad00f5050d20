"""Neural-network modules: the Memory Layer and the blocks built from it."""

from mf_lightning.nn.memory_layer import MemoryLayer

__all__ = ["MemoryLayer"]
