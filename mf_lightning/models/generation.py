"""Autoregressive decoding for any ``DecoderLM``: greedy, temperature, top-k and top-p sampling.

With ``use_cache`` the prompt is run once and every new token attends to cached keys and values,
through the fixed-shape step of :mod:`mf_lightning.models.decode_step` (compiled unless
``compile=False``); without it the whole sequence is recomputed at each step (slower, and the
reference the cache is tested against).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from mf_lightning.models.decode_step import StaticDecoder

if TYPE_CHECKING:
    from mf_lightning.models.base import DecoderLM


def generate(
    model: DecoderLM,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    compile: bool = True,
) -> torch.Tensor:
    """Prompts ``idx [B, T]`` followed by up to ``max_new_tokens`` generated tokens, ``[B, T + n]``.

    ``temperature=0`` is greedy (argmax); otherwise logits are divided by ``temperature``, cut to the
    ``top_k`` most likely tokens and then to the smallest set whose probability reaches ``top_p``, and
    sampled with ``generator``. A row that produced ``eos_id`` is padded with ``eos_id`` afterwards;
    decoding stops early once every row has. The model runs in eval mode (no dropout) and is put back
    in its previous mode afterwards. ``compile`` runs the cached decoding step through ``torch.compile``
    (compiled once per model shape, dtype and device in a process, then reused; eager if that fails).
    """
    steps = stream(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator, compile)
    tokens = idx.new_empty(idx.shape[0], idx.shape[1] + max_new_tokens)
    tokens[:, : idx.shape[1]] = idx
    length = idx.shape[1]
    for token in steps:
        tokens[:, length] = token
        length += 1
    return tokens[:, :length]


def stream(
    model: DecoderLM,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    compile: bool = True,
) -> Iterator[torch.Tensor]:
    """The tokens :func:`generate` appends to ``idx [B, T]``, one ``[B]`` tensor per step as soon as it exists.

    The arguments are checked here, before any decoding; the model is in eval mode while the iterator
    runs and back in its previous mode once it is exhausted or closed.
    """
    check_generate_args(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id)
    steps = decode(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator, compile)
    return in_eval_mode(model, steps)


@torch.no_grad()
def in_eval_mode(model: DecoderLM, steps: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Run ``steps`` without gradients and with ``model`` in eval mode, restoring its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield from steps
    finally:
        model.train(was_training)


def decode(
    model: DecoderLM,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    use_cache: bool,
    generator: torch.Generator | None,
    compile: bool,
) -> Iterator[torch.Tensor]:
    """The decoding loop of :func:`stream`, on checked arguments.

    With the cache, the prompt runs once and each step runs the model on the one new token
    (:class:`~mf_lightning.models.decode_step.StaticDecoder`: caches allocated once for the whole prompt
    + ``max_new_tokens``); without it, each step runs the whole sequence so far.
    """
    decoder = StaticDecoder(model, idx.shape[1] + max_new_tokens, compile) if use_cache else None
    tokens = idx
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device) if eos_id is not None else None
    for step in range(max_new_tokens):
        if decoder is None:
            logits = model.compute_logits(tokens)[:, -1]
        else:
            logits = decoder.prefill(idx) if step == 0 else decoder.step(token)  # noqa: F821 (set by the step before)
        token = sample(logits, temperature, top_k, top_p, generator).to(idx.dtype)
        if finished is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        yield token
        if finished is not None and bool(finished.all()):
            return
        if decoder is None:
            tokens = torch.cat([tokens, token[:, None]], dim=1)


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits [B, vocab]`` (argmax at ``temperature == 0``)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches ``top_p`` (nucleus); -inf the rest.

    A token is dropped when the tokens more likely than it already reach ``top_p``, so the most
    likely token always stays.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(before >= top_p, -math.inf)
    return logits.scatter(-1, order, sorted_logits)


def check_generate_args(
    model: DecoderLM,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
) -> None:
    """Raise a clear error for any argument of :func:`generate` that cannot work."""
    config = model.config
    model.check_tokens(idx)
    if bool((idx < 0).any()) or bool((idx >= config.vocab_size).any()):
        raise ValueError(
            f"idx holds token ids outside [0, {config.vocab_size}): min {int(idx.min())}, max {int(idx.max())}"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if idx.shape[1] + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"prompt of {idx.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds "
            f"max_seq_len={config.max_seq_len}; shorten the prompt or generate fewer tokens"
        )
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive integer, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    valid_eos = isinstance(eos_id, int) and not isinstance(eos_id, bool) and 0 <= eos_id < config.vocab_size
    if eos_id is not None and not valid_eos:
        raise ValueError(f"eos_id must be None or a token id in [0, {config.vocab_size}), got {eos_id!r}")
