"""Decoder blocks: ``MemoryBlock`` (SPEC §2, the MemoryFormer authors' block) and ``GPTNeoXBlock`` (Pythia).

``MemoryBlock`` is pre-norm with sequential residuals and GPT-NeoX's RMSNorm, as the authors' GPT-NeoX
fork computes it; ``GPTNeoXBlock`` is the Pythia baseline exactly as ``transformers``' ``GPTNeoXLayer``
computes it with Pythia's config (LayerNorm, parallel residual, fused per-head QKV). Each block class
names the norm it puts on the residual stream (``residual_norm``), which the model also uses as its final
norm. Both take ``(x, cos, sin, cache)``: the residual stream ``[B, T, d]``, the rotary angles of the ``T``
positions and an optional :class:`~mf_lightning.nn.attention.KVCache`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mf_lightning.config import ModelConfig
from mf_lightning.nn.attention import CausalSelfAttention, KVCache
from mf_lightning.nn.hash_input import HashInput
from mf_lightning.nn.layers import NormalLinear
from mf_lightning.nn.memory_layer import MemoryLayer
from mf_lightning.nn.norms import GPTNeoXRMSNorm

FFN_TABLE_STD = 0.02
BIAS_STD = 1e-3


def small_init_std(width: int) -> float:
    """GPT-NeoX's ``small_init`` (``megatron/model/init_functions.py``): std ``sqrt(2 / (5 d))``."""
    return math.sqrt(2 / (5 * width))


def wang_init_std(n_layer: int, width: int) -> float:
    """GPT-NeoX's ``wang_init`` (``megatron/model/init_functions.py``): std ``2 / n_layer / sqrt(d)``."""
    return 2 / n_layer / math.sqrt(width)


class MemoryBlock(nn.Module):
    """``x + MHA(ML_qkv(RMSNorm(x)))`` then ``x + ML_2(LayerNorm(ML_1(RMSNorm(x))))`` (SPEC §2).

    Q, K and V come from ONE Memory Layer ``d -> 3d`` so they share one hash of the normalised input;
    there is no output projection. The feed-forward ``ML_1: d -> K*(tau+extra)``, an affine LayerNorm
    (sign hashing wants zero-mean inputs; eps ``layer_norm_eps``, fixed at torch's 1e-5 in the authors'
    code) and ``ML_2`` with code length ``tau+extra`` back to ``d``; no activation, hashing is the
    non-linearity. The RMSNorms are GPT-NeoX's (:class:`~mf_lightning.nn.norms.GPTNeoXRMSNorm`, eps
    ``rms_norm_eps``). Init as in the authors' code: Q/K/V tables ``small_init`` ``N(0, 2/(5d))``, FFN
    tables ``N(0, 0.02**2)``, biases ``N(0, 0.001**2)``. Each Memory Layer reads its input through a
    :class:`~mf_lightning.nn.hash_input.HashInput` (``*_hash_input``), an identity unless a
    bucket-collapse remedy of the config is on.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.n_embd
        layer = {
            "score": config.score,
            "backend": config.backend,
            "triton_backward": config.triton_backward,
            "kernel_check": config.kernel_check,
            "bias_init_std": BIAS_STD,
        }
        self.attn_norm = self.residual_norm(config)
        remedies = {"centering": config.hash_centering, "balance_weight": config.bucket_balance_weight}
        self.qkv_hash_input = HashInput(d, **remedies)
        self.qkv = MemoryLayer(d, 3 * d, config.code_bits, init_std=small_init_std(d), **layer)
        self.attention = CausalSelfAttention(config.n_head, config.dropout)
        self.ffn_norm = self.residual_norm(config)
        self.ffn_in_hash_input = HashInput(d, **remedies)
        self.ffn_in = MemoryLayer(d, config.ffn_hidden, config.code_bits, init_std=FFN_TABLE_STD, **layer)
        self.ffn_mid_norm = nn.LayerNorm(config.ffn_hidden, eps=config.layer_norm_eps)
        self.ffn_out_hash_input = HashInput(config.ffn_hidden, **remedies)
        self.ffn_out = MemoryLayer(config.ffn_hidden, d, config.ffn_code_bits, init_std=FFN_TABLE_STD, **layer)
        self.dropout = nn.Dropout(config.dropout)

    @staticmethod
    def residual_norm(config: ModelConfig) -> nn.Module:
        """The norm this block (and the model's final norm) puts on the residual stream."""
        return GPTNeoXRMSNorm(config.n_embd, eps=config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.qkv(self.qkv_hash_input(self.attn_norm(x))), cos, sin, cache))
        hidden = self.ffn_mid_norm(self.ffn_in(self.ffn_in_hash_input(self.ffn_norm(x))))
        return x + self.dropout(self.ffn_out(self.ffn_out_hash_input(hidden)))


class GPTNeoXBlock(nn.Module):
    """``x + W_O MHA(W_qkv LN_1(x)) + W_2 GELU(W_1 LN_2(x))``: Pythia's block (GPT-NeoX, parallel residual).

    As ``transformers``' ``GPTNeoXLayer`` with ``use_parallel_residual=True``: LayerNorms with eps
    ``layer_norm_eps``, a fused QKV projection with bias in GPT-NeoX's per-head layout, an output projection
    ``W_O`` with bias, an exact-GELU feed-forward of width ``ffn_multiplier * d`` with biases. Init as in
    Pythia's GPT-NeoX configs (``init_method: small_init``, ``output_layer_init_method: wang_init``): the
    two projections back into the residual stream (``proj``, ``ffn_out``) ``wang_init``, the others
    ``small_init``; biases zero. Parameter names differ from transformers' (see
    :mod:`mf_lightning.models.gpt_neox`, which maps them).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.n_embd
        inner, outer = small_init_std(d), wang_init_std(config.n_layer, d)
        self.attn_norm = self.residual_norm(config)
        self.qkv = NormalLinear(d, 3 * d, std=inner)
        self.attention = CausalSelfAttention(config.n_head, config.dropout, qkv_layout="per_head")
        self.proj = NormalLinear(d, d, std=outer)
        self.ffn_norm = self.residual_norm(config)
        self.ffn_in = NormalLinear(d, config.ffn_hidden, std=inner)
        self.ffn_out = NormalLinear(config.ffn_hidden, d, std=outer)
        self.dropout = nn.Dropout(config.dropout)

    @staticmethod
    def residual_norm(config: ModelConfig) -> nn.Module:
        """The norm this block (and the model's final norm) puts on the residual stream."""
        return nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        attention = self.proj(self.attention(self.qkv(self.attn_norm(x)), cos, sin, cache))
        feed_forward = self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x))))
        return self.dropout(feed_forward) + self.dropout(attention) + x
