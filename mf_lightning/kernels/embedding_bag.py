"""Fast PyTorch Memory Layer: one ``embedding_bag`` over the flattened tables.

Every token is a bag of ``K`` rows (one per table, offset by ``k * 2**tau`` into the flattened tables)
weighted by the chunk scores. ``embedding_bag`` fuses gather and weighted sum, never materialises the
``[tokens, K, out]`` tensor, and returns a dense table gradient, so it is the fast path on CPU and the
fallback on GPUs without triton.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mf_lightning.kernels.hashing import bucket_indices, chunk_scores


def embedding_bag_memory_layer(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    code_bits: int,
    score: str,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`mf_lightning.kernels.reference.reference_memory_layer`."""
    num_tables, num_rows, out_features = tables.shape
    chunks = x.reshape(-1, num_tables, code_bits)
    buckets = bucket_indices(chunks)
    num_tokens = chunks.shape[0]
    if torch.compiler.is_compiling():  # constants of the graph, folded by the compiler, not cached
        offsets, starts = multiples(num_tables, num_rows, x.device), multiples(num_tokens, num_tables, x.device)
    else:
        offsets, starts = table_offsets(num_tables, num_rows, x.device), bag_starts(num_tokens, num_tables, x.device)
    rows = (buckets + offsets).view(-1)
    scores = chunk_scores(chunks, score, temperature).to(tables.dtype).view(-1)
    y = F.embedding_bag(
        rows,
        tables.view(num_tables * num_rows, out_features),
        starts,
        per_sample_weights=scores,
        mode="sum",
    )
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], out_features), buckets.view(*x.shape[:-1], num_tables)


def multiples(count: int, step: int, device: torch.device) -> torch.Tensor:
    """``0, step, ..., (count - 1) * step`` as int64."""
    return torch.arange(0, count * step, step, device=device, dtype=torch.int64)


@functools.cache
def table_offsets(num_tables: int, num_rows: int, device: torch.device) -> torch.Tensor:
    """Row of the first bucket of each table in the flattened ``[K * 2**tau, out]`` tables."""
    with torch.inference_mode(False):  # kept for later calls, which may need gradients
        return multiples(num_tables, num_rows, device)


@functools.lru_cache(maxsize=16)
def bag_starts(num_tokens: int, num_tables: int, device: torch.device) -> torch.Tensor:
    """Where each token's bag of ``num_tables`` rows starts in the flattened rows (kept, not rebuilt per call).

    Made outside inference mode even when the first call is in it (decoding, validation): ``embedding_bag``
    saves it for the backward of a later training call, and an inference tensor cannot be saved.
    """
    with torch.inference_mode(False):
        return multiples(num_tokens, num_tables, device)
