"""Memory Layer compute: pure-torch reference, embedding_bag path and triton kernels, by backend."""

from mf_lightning.kernels.dispatch import BACKENDS, memory_layer, memory_layer_and_buckets, resolve_backend
from mf_lightning.kernels.hashing import SCORES, bucket_indices, chunk_scores

__all__ = [
    "BACKENDS",
    "SCORES",
    "bucket_indices",
    "chunk_scores",
    "memory_layer",
    "memory_layer_and_buckets",
    "resolve_backend",
]
