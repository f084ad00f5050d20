"""Memory Layer inputs whose chunks hash to chosen buckets: uniform, or skewed as collapsed layers are."""

from __future__ import annotations

import torch

SKEWS = ("uniform", "half on one row", "hot row")
"""Bucket usages :func:`skewed_buckets` makes: random, half the tokens on one row of each table, all of them."""
HOT_ROW = 5


def inputs_hashing_to(buckets: torch.Tensor, code_bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[tokens, tables * code_bits]`` float32 input whose chunk ``k`` of token ``n`` hashes to
    ``buckets[n, k]``: signs set bit by bit (``z >= 0`` is bit 1, most significant first), random magnitudes."""
    bits = (buckets.unsqueeze(-1) >> torch.arange(code_bits - 1, -1, -1)) & 1
    magnitudes = 0.1 + torch.rand(bits.shape, generator=generator)
    return torch.where(bits == 1, magnitudes, -magnitudes).flatten(1)


def skewed_buckets(skew: str, tokens: int, tables: int, code_bits: int, generator: torch.Generator) -> torch.Tensor:
    """int64 ``[tokens, tables]`` buckets with the bucket usage ``skew`` (one of :data:`SKEWS`)."""
    uniform = torch.randint(0, 2**code_bits, (tokens, tables), generator=generator)
    if skew == "uniform":
        return uniform
    hot = torch.full_like(uniform, HOT_ROW % 2**code_bits)
    if skew == "hot row":
        return hot
    return torch.where(torch.rand(tokens, 1, generator=generator) < 0.5, hot, uniform)
