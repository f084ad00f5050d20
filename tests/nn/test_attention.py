"""Rotary embedding, causal self-attention and its KV cache."""

import pytest
import torch
import torch.nn.functional as F

from mf_lightning.nn.attention import CausalSelfAttention, KVCache, apply_rotary, causal_mask, rotary_cos_sin


def test_rotary_scores_depend_only_on_relative_position() -> None:
    q, k = torch.randn(2, 16, dtype=torch.float64)

    def score(m: int, n: int) -> torch.Tensor:
        cos, sin = rotary_cos_sin(torch.tensor([m, n]), rotary_dims=8, base=10000.0)
        rotated_q = apply_rotary(q[None].double(), cos[:1].double(), sin[:1].double())
        rotated_k = apply_rotary(k[None].double(), cos[1:].double(), sin[1:].double())
        return (rotated_q * rotated_k).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    assert not torch.allclose(score(7, 3), score(3, 7))


def test_rotary_turns_only_the_first_rotary_dims_and_keeps_norms() -> None:
    x = torch.randn(3, 5, 16)
    cos, sin = rotary_cos_sin(torch.arange(5), rotary_dims=4, base=10000.0)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y[..., 4:], x[..., 4:])
    torch.testing.assert_close(y[0, 0], x[0, 0])
    torch.testing.assert_close(y[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1))
    assert not torch.allclose(y[:, 1:, :4], x[:, 1:, :4])


def test_rotary_with_no_dims_is_identity() -> None:
    x = torch.randn(2, 3, 8)
    cos, sin = rotary_cos_sin(torch.arange(3), rotary_dims=0, base=10000.0)
    assert apply_rotary(x, cos, sin) is x


def test_causal_mask_for_new_tokens_after_cached_ones() -> None:
    assert causal_mask(4, 4, torch.device("cpu")) is None
    assert causal_mask(1, 9, torch.device("cpu")) is None
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(causal_mask(2, 4, torch.device("cpu")), expected)


def reference_attention(qkv: torch.Tensor, n_head: int, rotary_dims: int) -> torch.Tensor:
    """Explicit softmax(QK^T/sqrt(h) + causal mask) V per head."""
    batch, length, width = qkv.shape
    q, k, v = (t.unflatten(-1, (n_head, -1)).transpose(1, 2) for t in qkv.split(width // 3, dim=-1))
    cos, sin = rotary_cos_sin(torch.arange(length), rotary_dims, 10000.0)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    return (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, length, -1)


def test_attention_matches_explicit_causal_softmax() -> None:
    qkv = torch.randn(2, 7, 3 * 24)
    cos, sin = rotary_cos_sin(torch.arange(7), 4, 10000.0)
    torch.testing.assert_close(CausalSelfAttention(n_head=3)(qkv, cos, sin), reference_attention(qkv, 3, 4))


@pytest.mark.parametrize("steps", [[1] * 9, [4, 1, 1, 3]])
def test_kv_cache_in_pieces_equals_full_sequence(steps: list[int]) -> None:
    attention, qkv = CausalSelfAttention(n_head=2), torch.randn(2, 9, 3 * 16)
    full = attention(qkv, *rotary_cos_sin(torch.arange(9), 4, 10000.0))
    cache, start, pieces = KVCache(max_len=9), 0, []
    for step in steps:
        cos, sin = rotary_cos_sin(torch.arange(start, start + step), 4, 10000.0)
        pieces.append(attention(qkv[:, start : start + step], cos, sin, cache))
        start += step
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


def test_kv_cache_overflow_is_a_clear_error() -> None:
    cache = KVCache(max_len=3)
    cache.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="KV cache holds 3 positions; 4 were requested"):
        cache.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))


def test_attention_dropout_only_in_training() -> None:
    attention, qkv = CausalSelfAttention(n_head=2, dropout=0.5), torch.randn(1, 6, 3 * 8)
    cos, sin = rotary_cos_sin(torch.arange(6), 0, 10000.0)
    assert not torch.equal(attention(qkv, cos, sin), attention(qkv, cos, sin))
    attention.eval()
    torch.testing.assert_close(attention(qkv, cos, sin), reference_attention(qkv, 2, 0))
