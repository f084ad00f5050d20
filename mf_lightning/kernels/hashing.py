"""Sign hashing and chunk scores of the Memory Layer (SPEC §1, steps 2-3), shared by every backend.

The bucket of a chunk is its sign pattern read as a binary number, most significant bit first, with
``z >= 0`` as bit 1 (so 0.0 and -0.0 hash to 1). The score is the differentiable weight of the
retrieved row: the softmax probability of the chosen bucket (``paper``) or that probability times the
chunk's L1 norm (``scaled``, the authors' code).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

SCORES = ("scaled", "paper")
MAX_CODE_BITS = 16
"""Longest chunk: float32 place values stay exact and tables stay addressable (2**16 rows each)."""


@functools.cache
def bit_weights(code_bits: int, device: torch.device) -> torch.Tensor:
    """Place values ``2**(code_bits-1-j)`` of the bits of a chunk, most significant first, as float32.

    Float32 holds every bucket index exactly (``2**16 < 2**24``), and a float matrix-vector product is
    several times faster than an integer multiply-sum on CPU.
    """
    return 2.0 ** torch.arange(code_bits - 1, -1, -1, device=device, dtype=torch.float32)


def bucket_indices(chunks: torch.Tensor) -> torch.Tensor:
    """Bucket index in ``[0, 2**tau)`` of each chunk ``[..., K, tau]``, as int64 ``[..., K]``."""
    bits = (chunks >= 0).to(torch.float32)
    # torch.compile traces through the cache (and warns that it does); in a graph the weights are a constant.
    place_values = bit_weights.__wrapped__ if torch.compiler.is_compiling() else bit_weights
    weights = place_values(chunks.shape[-1], chunks.device)
    device = chunks.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return (bits @ weights).to(torch.int64)
    return (bits @ weights).to(torch.int64)


def check_score(score: str, temperature: float) -> None:
    """Reject a score variant or temperature with a message naming the value and what is valid.

    The one check of these settings, made where they enter: the ``MemoryLayer`` constructor and the
    functional :func:`mf_lightning.kernels.memory_layer` (``ModelConfig`` checks its own fields).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if isinstance(temperature, bool) or not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def chunk_scores(chunks: torch.Tensor, score: str = "scaled", temperature: float = 1.0) -> torch.Tensor:
    """Differentiable score ``s_k`` of each chunk ``[..., K, tau]``, computed in float32 at least.

    ``score`` and ``temperature`` are trusted (see :func:`check_score`).

    ``paper``: ``prod_j sigmoid(2|z_j|/t)``, evaluated in log space as ``exp(sum_j logsigmoid(2|z_j|/t))``. ``scaled``: the same times ``sum_j |z_j|``;
    at the default ``t = 1`` this is exactly the authors' ``sum|z| / prod(1 + exp(-2|z|))``.
    """
    z = chunks if chunks.dtype == torch.float64 else chunks.float()
    magnitude = z.abs()
    probability = F.logsigmoid(magnitude * (2.0 / temperature)).sum(-1).exp()
    if score == "paper":
        return probability
    return magnitude.sum(-1) * probability
