"""How evenly tokens spread over the buckets of hash tables, from bucket counts ``[..., num_buckets]``.

Each function reduces the last dimension (the tokens that landed in each bucket of one table) and
returns float32 ``[...]``, one value per table. A sign-hash table works best when every bucket is
used about equally often: then every row gets trained and the layer can tell inputs apart.

A table that saw no tokens (all-zero counts) has no distribution; every metric returns 0 for it, so
an empty window reads as "nothing used" rather than as NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

TOP_FRACTION = 0.01
USED_FRACTION = "used_fraction"
"""Name of the ``used_fraction`` metric: the one that shows bucket collapse first."""


def check_counts(counts: torch.Tensor) -> torch.Tensor:
    """Return ``counts`` as float32 after checking it is ``[..., num_buckets >= 1]`` and non-negative."""
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"bucket counts must be a torch.Tensor [..., num_buckets], got {type(counts).__name__}")
    if counts.dim() == 0 or counts.shape[-1] == 0:
        raise ValueError(f"bucket counts need a last dimension of at least one bucket, got shape {tuple(counts.shape)}")
    if counts.is_floating_point() and not torch.isfinite(counts).all():
        raise ValueError("bucket counts must be finite, got NaN or infinity")
    if (counts < 0).any():
        raise ValueError(f"bucket counts must be non-negative, got minimum {counts.min().item()}")
    return counts.float()


def bucket_probabilities(counts: torch.Tensor) -> torch.Tensor:
    """Share of each table's tokens in each bucket; all zeros for a table without tokens."""
    counts = check_counts(counts)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1e-30)


def used_fraction(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of buckets hit at least once: 1 when every row of the table was used."""
    return (check_counts(counts) > 0).float().mean(-1)


def entropy(counts: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the bucket distribution in nats (``0 log 0 = 0``)."""
    p = bucket_probabilities(counts)
    return -torch.special.xlogy(p, p).sum(-1)


def normalized_entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy divided by its maximum ``log(num_buckets)``: 1 for a uniform spread, 0 for one bucket.

    A table of a single bucket has no spread to measure and reads 1 when used (it is trivially uniform).
    """
    num_buckets = counts.shape[-1]
    if num_buckets == 1:
        return used_fraction(counts)
    return entropy(counts) / math.log(num_buckets)


def kl_to_uniform(counts: torch.Tensor) -> torch.Tensor:
    """KL divergence in nats from the uniform distribution, ``log(num_buckets) - entropy``: 0 when uniform."""
    counts = check_counts(counts)
    used = counts.sum(-1) > 0
    return torch.where(used, math.log(counts.shape[-1]) - entropy(counts), 0.0).clamp_min(0.0)


def gini(counts: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of the counts: 0 for an equal spread, ``1 - 1/num_buckets`` for one bucket.

    With counts sorted ascending ``c_1 <= ... <= c_n``: ``2 * sum_i i * c_i / (n * sum c) - (n + 1) / n``.
    """
    counts = check_counts(counts)
    n = counts.shape[-1]
    ascending = counts.sort(-1).values
    rank = torch.arange(1, n + 1, device=counts.device, dtype=counts.dtype)
    total = counts.sum(-1)
    value = 2 * (ascending * rank).sum(-1) / (n * total.clamp_min(1e-30)) - (n + 1) / n
    return torch.where(total > 0, value, 0.0).clamp_min(0.0)


def top_share(counts: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """Share of tokens in the busiest ``max(1, floor(fraction * num_buckets))`` buckets.

    Uniform use gives about ``fraction``; everything in one bucket gives 1.
    """
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"fraction of top buckets must be in (0, 1], got {fraction!r}")
    p = bucket_probabilities(counts)
    k = max(1, math.floor(fraction * p.shape[-1]))
    return p.topk(k, dim=-1).values.sum(-1)


USAGE_METRICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    USED_FRACTION: used_fraction,
    "normalized_entropy": normalized_entropy,
    "kl_to_uniform": kl_to_uniform,
    "gini": gini,
    "top1pct_share": top_share,
}


def usage_metrics(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every metric of ``USAGE_METRICS`` for each table of ``counts`` ``[..., num_buckets]``."""
    check_counts(counts)
    return {name: metric(counts) for name, metric in USAGE_METRICS.items()}


def counts_with_gini(num_hits: int, num_rows: int, target: float) -> torch.Tensor:
    """Hits per row, summing to ``num_hits``, from geometric row probabilities tuned to the ``target`` Gini:
    the skewed bucket usage that tests and benchmarks of the kernels reproduce (training measured 0.93)."""
    low, high = 1.0, 100.0
    for _ in range(60):
        decay = (low + high) / 2
        weights = torch.exp(-torch.arange(num_rows, dtype=torch.float64) * decay / num_rows)
        counts = torch.floor(num_hits * weights / weights.sum()).long()
        counts[0] += num_hits - counts.sum()
        low, high = (low, decay) if float(gini(counts)) > target else (decay, high)
    return counts
