"""Decoding with the KV cache: the prompt once, then every new token through one fixed-shape, compiled step.

Batch-1 decoding reads little memory per token, so on a CPU the cost of each operator call (a few µs)
sets the speed as much as the bytes do. Every Memory Layer of a step (no gradients, a few tokens) is one
call of the fused CPU operator, which hashes, scores, gathers and sums in one loop
(:mod:`mf_lightning.kernels.fused_cpu`), eagerly and compiled alike, and so is the attention of the
step's one query over the filled slots of the cache. :func:`decode_step` (embedding,
every block, final norm and LM head for one new token) runs through ``torch.compile`` (inductor) as ONE
call per token: the norms, the rotary embedding and the cache update fuse into a few loops around those
calls, and a narrow layer's hashing, gather and sum become inductor's own loop, which costs no call
(:func:`mf_lightning.kernels.dispatch.call_function`):

- The shapes of a step never change: the KV cache is allocated once for prompt + new tokens
  (:class:`~mf_lightning.nn.attention.StaticKVCache`), the token is written at a position held in a
  tensor and attention reads the whole cache with the later slots masked out. The cache's length is
  marked dynamic, so prompts and generation lengths of any size share one graph.
- Every block is the same code with different weights, so the block is a nested compile region
  (``torch.compiler.nested_compile_region``): compiled once and called once per block inside the
  step's graph. Compile time does not grow with depth, and the step costs one call (and one check of
  dynamo's guards) per token, not one per block. A new width, dtype, device, architecture, batch size
  or torch thread count compiles once more (dynamo keeps up to ``torch._dynamo.config.recompile_limit``
  variants, 8 by default, then runs further ones eagerly); inductor's on-disk cache makes the next
  process's compile cheaper.
- Every shape but the cache's length is static (``dynamic=False``): a second model with other widths
  gets a graph of its own, as above, instead of dynamo's automatic dynamic shapes, which would turn the
  widths it saw change (head size, rotary dimensions) into symbols. With such symbols torch 2.13
  cannot stamp the traced block out for the next block (its reuse of a nested region looks a
  specialised symbol up by its value: ``InternalTorchDynamoError: KeyError: 12``), so the second model
  of a process, and every one after it, decoded eagerly.

The prompt (prefill) runs eagerly with causal attention over its own tokens and the LM head on its
last position only. If ``torch.compile`` is unavailable or fails, decoding goes on eagerly, through the
same :func:`decode_step`, after one warning for the process.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mf_lightning.nn.attention import KVCache, StaticKVCache

if TYPE_CHECKING:
    from mf_lightning.models.base import DecoderLM


def run_block(
    block: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position: torch.Tensor,
) -> torch.Tensor:
    """One block on the new tokens ``x [B, 1, d]`` with its cache's tensors: the region every block reuses.

    The cache comes as its tensors, not as a :class:`StaticKVCache`: a region's inputs must be tensors and
    modules (dynamo inlines a region called with other objects, and compiles every block anew).
    """
    return block(x, cos, sin, StaticKVCache(keys, values, position))


block_region = torch.compiler.nested_compile_region(run_block)


def run_block_region(
    block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: StaticKVCache
) -> torch.Tensor:
    """``block(x, cos, sin, cache)`` as a call of :data:`block_region` (a ``BlockRunner`` of ``hidden_states``)."""
    return block_region(block, x, cos, sin, cache.keys, cache.values, cache.position)


def decode_step(model: DecoderLM, token: torch.Tensor, caches: list[StaticKVCache]) -> torch.Tensor:
    """Logits ``[B, vocab]`` of the token after ``token [B]``, whose keys and values are written into ``caches``.

    Called eagerly, the nested compile region is a plain call: the eager step is the same code.
    """
    return model.compute_logits(token[:, None], caches, run_block_region)[:, -1]


def compile_decode_step(backend: str | Callable[..., Any] = "inductor") -> Callable[..., torch.Tensor]:
    """:func:`decode_step` through ``torch.compile`` with ``backend``: static shapes but for the cache lengths that
    :func:`static_cache` marks dynamic, so each model shape gets its own graph (see the module)."""
    return torch.compile(decode_step, backend=backend, dynamic=False)


compiled_decode_step = compile_decode_step()
compile_failure: str | None = None
"""Why compiling the step failed in this process (then every step runs eagerly), None while it works."""


def run_decode_step(model: DecoderLM, token: torch.Tensor, caches: list[StaticKVCache]) -> torch.Tensor:
    """:func:`decode_step` through the compiled step; eagerly, after one warning, once compiling failed."""
    global compile_failure
    if compile_failure is None:
        try:
            return compiled_decode_step(model, token, caches)
        except Exception as error:  # whatever stops the compiler (no C++ compiler, a platform or operator it
            # does not support), the eager step computes the same tokens
            compile_failure = f"{type(error).__name__}: {first_line(error)}"
            warnings.warn(
                f"compiling the decoding step failed ({compile_failure}); decoding eagerly, which is slower "
                "(generate(..., compile=False) skips the attempt)",
                RuntimeWarning,
                stacklevel=2,
            )
    return decode_step(model, token, caches)


def first_line(error: Exception) -> str:
    """The first non-empty line of an exception's message (compiler errors run to pages)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")


class StaticDecoder:
    """One generation's KV caches: :meth:`prefill` runs the prompt, :meth:`step` each new token.

    Args:
        model: the language model (in eval mode, without gradients: the caller's business).
        max_len: positions to allocate, prompt plus new tokens; the cache never grows.
        compile: run each step through the compiled step (else eagerly, the reference).
    """

    def __init__(self, model: DecoderLM, max_len: int, compile: bool = True) -> None:
        self.model = model
        self.max_len = max_len
        self.compile = compile
        self.caches = model.new_kv_caches(max_len)
        self.static_caches: list[StaticKVCache] = []
        self.position: torch.Tensor | None = None
        self.length = 0

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab]`` of the token after the prompts ``idx [B, T]``, whose keys and values are cached."""
        if self.static_caches:
            raise RuntimeError("prefill runs once per StaticDecoder, before the first step")
        hidden = self.model.hidden_states(idx, self.caches)[:, -1]
        self.length = idx.shape[1]
        self.position = torch.tensor([self.length], device=idx.device)
        self.static_caches = [static_cache(cache, self.position) for cache in self.caches]
        return F.linear(hidden, self.model.head_weight)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab]`` of the token after ``token [B]``, which is appended to the cache."""
        if not self.static_caches or self.position is None:
            raise RuntimeError("call prefill with the prompt before the first step")
        if self.length >= self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions, all filled; allocate a longer one")
        step = run_decode_step if self.compile else decode_step
        logits = step(self.model, token, self.static_caches)
        self.position += 1
        self.length += 1
        return logits


def static_cache(cache: KVCache, position: torch.Tensor) -> StaticKVCache:
    """``cache``'s storage for the fixed-shape step, its length marked dynamic so that every length shares a graph."""
    static = cache.static(position)
    for storage in (static.keys, static.values):
        torch._dynamo.maybe_mark_dynamic(storage, 2)
    return static
