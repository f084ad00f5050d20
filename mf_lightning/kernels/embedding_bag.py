"""Fast PyTorch Memory Layer: one ``embedding_bag`` over the flattened tables.

Every token is a bag of ``K`` rows (one per table, offset by ``k * 2**tau`` into the flattened tables)
weighted by the chunk scores. ``embedding_bag`` fuses gather and weighted sum, never materialises the
``[tokens, K, out]`` tensor, and returns a dense table gradient, so it is the fast path on CPU and the
fallback on GPUs without triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mf_lightning.kernels.hashing import bucket_indices, chunk_scores


def memory_layer(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    code_bits: int,
    score: str,
    temperature: float,
) -> torch.Tensor:
    """Same contract as :func:`mf_lightning.kernels.reference.memory_layer`."""
    num_tables, num_rows, out_features = tables.shape
    chunks = x.reshape(-1, num_tables, code_bits)
    offsets = torch.arange(num_tables, device=x.device, dtype=torch.int64) * num_rows
    rows = bucket_indices(chunks) + offsets
    scores = chunk_scores(chunks, score, temperature).to(tables.dtype)
    y = F.embedding_bag(
        rows, tables.reshape(num_tables * num_rows, out_features), per_sample_weights=scores, mode="sum"
    )
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_features)
