"""Causal multi-head self-attention over already projected queries, keys and values, with a KV cache.

The projections are not part of this module: a MemoryFormer block produces Q, K and V with one Memory
Layer and has no output projection, the baseline uses ``nn.Linear`` for both, so each block owns its
own and this module does only what they share: heads, rotary embedding, caching and
``F.scaled_dot_product_attention``.

Rotary position embedding turns the first ``rotary_dims`` dimensions of every head, in the GPT-NeoX /
Pythia layout: the rotated dimensions are split into two halves and dimension ``i`` of the first half is
turned together with dimension ``i`` of the second, by the angle ``position * base**(-2i/r)``. The
remaining dimensions of the head pass through unchanged (SPEC §2: 25% of each head is rotated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values ``[B, heads, positions, head_size]`` of the tokens seen so far, for decoding.

    Storage for ``max_len`` positions is allocated on the first :meth:`append`, with the dtype and
    device of the keys it receives (so autocast and device moves need no extra arguments).
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new ``keys``/``values`` after the cached ones; return all of them so far."""
        end = self.length + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were requested")
        if self.keys is None or self.values is None:
            batch, heads, _, head_size = keys.shape
            self.keys = keys.new_empty(batch, heads, self.max_len, head_size)
            self.values = values.new_empty(batch, heads, self.max_len, head_size)
        self.keys.narrow(2, self.length, keys.shape[2]).copy_(keys)
        self.values.narrow(2, self.length, keys.shape[2]).copy_(values)
        self.length = end
        return self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end)


class CausalSelfAttention(nn.Module):
    """``[B, T, 3*d]`` concatenated Q, K, V -> ``[B, T, d]`` causal attention output (heads merged).

    Each of the ``T`` queries sits at the position after the cached ones and attends to itself and
    every earlier position. The module has no parameters.
    """

    def __init__(self, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout

    def forward(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        batch, length, _ = qkv.shape
        qkv = qkv.unflatten(-1, (3, self.n_head, -1)).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(qkv[:2], cos, sin)
        v = qkv[2]
        if cache is not None:
            k, v = cache.append(k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=causal_mask(length, k.shape[2], q.device),
            is_causal=length == k.shape[2] and length > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return y.transpose(1, 2).reshape(batch, length, -1)

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, dropout={self.dropout}"


def causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask for ``queries`` new tokens after ``keys - queries`` cached ones; None where SDPA needs none.

    No mask when the queries are all the keys (SDPA's ``is_causal`` does it) or a single new token
    (it sees everything); otherwise query ``i`` sees keys ``0 .. keys - queries + i``.
    """
    if queries == keys or queries == 1:
        return None
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=keys - queries)


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
