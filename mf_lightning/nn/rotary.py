"""Rotary position embedding on the first ``rotary_dims`` dimensions of every attention head.

GPT-NeoX / Pythia layout: the rotated dimensions are split into two halves and dimension ``i`` of the
first half is turned together with dimension ``i`` of the second, by the angle ``position * base**(-2i/r)``.
The remaining dimensions of the head pass through unchanged (SPEC §2: 25% of each head is rotated).
"""

from __future__ import annotations

import torch


def rotary_cos_sin(positions: torch.Tensor, rotary_dims: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines ``[len(positions), rotary_dims]`` (float32) of the rotation at each position.

    Computed per call from the positions instead of cached in a buffer: it is ``T * rotary_dims`` values,
    computed once per forward for all layers, and the model keeps no state that meta-device
    construction or ``load_state_dict`` would have to restore.
    """
    exponents = torch.arange(0, rotary_dims, 2, device=positions.device, dtype=torch.float32) / rotary_dims
    angles = positions.to(torch.float32)[:, None] * base ** (-exponents)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dimensions of ``x [..., T, head_size]`` by the angles of each position."""
    rotary_dims = cos.shape[-1]
    if rotary_dims == 0:
        return x
    rotated, passed = x[..., :rotary_dims], x[..., rotary_dims:]
    first, second = rotated.chunk(2, dim=-1)
    turned = torch.cat([-second, first], dim=-1)
    rotated = rotated * cos.to(x.dtype) + turned * sin.to(x.dtype)
    return torch.cat([rotated, passed], dim=-1)
