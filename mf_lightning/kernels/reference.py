"""Readable pure-PyTorch Memory Layer: the ground truth the other backends are tested against."""

from __future__ import annotations

import torch

from mf_lightning.kernels.hashing import bucket_indices, chunk_scores


def reference_memory_layer(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    code_bits: int,
    score: str,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = sum_k s_k * T_k[h_k] + bias`` by gathering one row per chunk and summing (SPEC §1.4).

    The contract of every backend: ``x [..., K*code_bits]``, ``tables [K, 2**code_bits, D]`` and
    ``bias [D]`` or None, already checked by :func:`mf_lightning.kernels.dispatch.check_inputs`, give
    ``(y [..., D], buckets [..., K])``: the output and the bucket of each chunk, which the layer hands
    to its observers instead of hashing again.
    """
    num_tables = tables.shape[0]
    chunks = x.reshape(*x.shape[:-1], num_tables, code_bits)
    buckets = bucket_indices(chunks)
    rows = tables[torch.arange(num_tables, device=x.device), buckets]
    scores = chunk_scores(chunks, score, temperature).to(rows.dtype)
    y = (scores.unsqueeze(-1) * rows).sum(-2)
    return (y if bias is None else y + bias), buckets
