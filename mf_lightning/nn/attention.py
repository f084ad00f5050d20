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

from mf_lightning.kernels.fused_cpu import fused_attention_applies, fused_cpu_attention


class KVCache:
    """Keys and values ``[B, heads, max_len, head_size]`` of the tokens seen so far, for decoding.

    Storage for ``max_len`` positions is allocated (zeroed) on the first :meth:`append`, with the batch,
    dtype and device of the keys it receives (so autocast and device moves need no extra arguments),
    and never grows. ``length`` positions are filled; each ``append`` stores its tokens after them and
    attention reads the filled prefix. :meth:`static` hands the same storage to the fixed-shape decoding
    step (:class:`StaticKVCache`).
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
            self.keys = keys.new_zeros(batch, heads, self.max_len, head_size)
            self.values = values.new_zeros(batch, heads, self.max_len, head_size)
        self.keys.narrow(2, self.length, keys.shape[2]).copy_(keys)
        self.values.narrow(2, self.length, keys.shape[2]).copy_(values)
        self.length = end
        return self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end)

    def attention_mask(self, queries: int, device: torch.device) -> torch.Tensor | None:
        """Mask of the ``queries`` tokens just appended over the keys :meth:`append` returned (:func:`causal_mask`)."""
        return causal_mask(queries, self.length, device)

    def next_positions(self, count: int, device: torch.device) -> torch.Tensor:
        """Positions ``[count]`` of the next ``count`` tokens."""
        return torch.arange(self.length, self.length + count, device=device)

    def static(self, position: torch.Tensor) -> StaticKVCache:
        """This cache's storage, written from now on at ``position`` (a ``[1]`` int64 tensor the caller advances).

        ``position`` must hold ``length``; the storage must exist (after the prompt was appended).
        """
        if self.keys is None or self.values is None:
            raise ValueError("the KV cache is empty: append the prompt before switching to the static step")
        return StaticKVCache(self.keys, self.values, position)


class StaticKVCache:
    """A KV cache's full storage ``[B, heads, max_len, head_size]`` and the position of the next token as a tensor.

    Every decoding step has the same shapes: one token's keys and values are written at ``position``
    (``index_copy_``, no growing tensor) and the query attends to all ``max_len`` slots, those after
    ``position`` masked out (they hold zeros, never garbage, so masked slots contribute exactly 0). The
    position is a ``[1]`` int64 tensor shared by all layers and advanced by the caller, so one compiled
    graph serves every position (:mod:`mf_lightning.models.decode_step`).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor) -> None:
        self.keys = keys
        self.values = values
        self.position = position

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``keys``/``values`` of ``T`` tokens at ``position .. position + T - 1``; return the whole storage."""
        positions = self.next_positions(keys.shape[2], keys.device)
        self.keys.index_copy_(2, positions, keys)
        self.values.index_copy_(2, positions, values)
        return self.keys, self.values

    def attention_mask(self, queries: int, device: torch.device) -> torch.Tensor:
        """``[queries, max_len]``: query ``i`` (at ``position + i``) sees slots ``0 .. position + i``."""
        slots = torch.arange(self.keys.shape[2], device=device)
        return slots <= self.next_positions(queries, device)[:, None]

    def next_positions(self, count: int, device: torch.device) -> torch.Tensor:
        """Positions ``[count]`` of the next ``count`` tokens."""
        return self.position + torch.arange(count, device=device)


QKV_LAYOUTS = ("grouped", "per_head")


class CausalSelfAttention(nn.Module):
    """``[B, T, 3*d]`` concatenated Q, K, V -> ``[B, T, d]`` causal attention output (heads merged).

    ``qkv_layout`` says how the ``3*d`` features are ordered: ``grouped`` is all of Q, then K, then V (each
    head after head: the MemoryFormer authors' three Memory Layers side by side); ``per_head`` is GPT-NeoX's
    fused projection, head after head, each head's Q, K, V together. Each of the ``T`` queries sits at the
    position after the cached ones and attends to itself and every earlier position. No parameters.
    """

    def __init__(self, n_head: int, dropout: float = 0.0, qkv_layout: str = "grouped") -> None:
        super().__init__()
        if qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"qkv_layout must be one of {', '.join(QKV_LAYOUTS)}; got {qkv_layout!r}")
        self.n_head = n_head
        self.dropout = dropout
        self.qkv_layout = qkv_layout

    def forward(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | StaticKVCache | None = None
    ) -> torch.Tensor:
        batch, length, _ = qkv.shape
        if self.qkv_layout == "grouped":
            qkv = qkv.unflatten(-1, (3, self.n_head, -1)).permute(2, 0, 3, 1, 4)
        else:
            qkv = qkv.unflatten(-1, (self.n_head, 3, -1)).permute(3, 0, 2, 1, 4)
        q, k = apply_rotary(qkv[:2], cos, sin)
        v = qkv[2]
        mask = None
        dropout = self.dropout if self.training else 0.0
        if cache is not None:
            k, v = cache.append(k, v)
            if isinstance(cache, StaticKVCache) and fused_attention_applies(q, k, dropout):
                return fused_cpu_attention(q, k, v, cache.position).transpose(1, 2).reshape(batch, length, -1)
            mask = cache.attention_mask(length, q.device)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and length == k.shape[2] and length > 1,
            dropout_p=dropout,
        )
        return y.transpose(1, 2).reshape(batch, length, -1)

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, dropout={self.dropout}, qkv_layout={self.qkv_layout}"


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
