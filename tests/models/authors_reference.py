"""A pure-torch transcription of the MemoryFormer authors' model, to test ours against (SPEC §2).

Transcribed from github.com/C0-Design/MemoryFormer at 59686737ec18f14277fc817041a004c0ecc58bd2 (a GPT-NeoX
fork), with its published config ``configs/memoryformer_tiny.yml`` (``norm: rmsnorm``, ``gpt-j-residual:
false``, ``del_dense: true``, ``remove_projection: true``, ``double_mlp_table``, ``mlp_expand_type:
extra_bit``, ``pos-emb: rotary``, ``rotary-pct: 0.25``, ``no-weight-tying``). Only model parallelism, fused
kernels and the ``[seq, batch, hidden]`` layout are left out (here ``[batch, seq, hidden]``); the operations
and their order are theirs. Nothing here imports mf_lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class RMSNorm(nn.Module):
    """megatron/model/norms.py:35-77 (``RMSNorm``, ``p=-1``, no bias); eps from neox_args ``rms_norm_epsilon``
    (megatron/neox_arguments/neox_args.py:174, 1e-8)."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps, self.d = eps, dim
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        norm_x = x.norm(2, dim=-1, keepdim=True)  # norms.py:62
        rms_x = norm_x * self.d ** (-1.0 / 2)  # norms.py:71
        x_normed = x / (rms_x + self.eps)  # norms.py:72
        return (self.scale * x_normed).to(dtype)  # norms.py:77


def compute_code_score_torch(hash_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """memory_module/compute_code_score/kernel.py:43-56 (``bin2dec``, ``compute_code_score_torch``): the bucket,
    most significant bit first, and ``sum|z| / prod(1 + exp(-2|z|))``."""
    code_length = hash_scores.shape[-1]
    binary_code = (hash_scores >= 0).to(hash_scores.dtype)
    mask = 2 ** torch.arange(code_length - 1, -1, -1, dtype=binary_code.dtype, device=binary_code.device)
    code = torch.sum(mask * binary_code, -1).int()
    max_hash_scores = hash_scores.abs()
    denominator = torch.prod(1 + torch.exp(-2 * max_hash_scores), dim=-1)
    return code, max_hash_scores.sum(dim=-1) / denominator


class MemoryLayer(nn.Module):
    """memory_module/memory.py:64-161 (``MemoryLayer`` with ``Hashing``, ``remove_projection``): tables
    ``[num_table * 2**code_length, output_size]`` ``0.02 * randn`` (memory.py:91), bias ``0.001 * randn``
    (memory.py:92); the forward is ``gather_compute_flops`` (memory.py:147, "mathematically equal" to the
    CUDA gather) plus the bias (memory.py:121)."""

    def __init__(self, hidden_size: int, output_size: int, num_table: int, code_length: int) -> None:
        super().__init__()
        self.num_table, self.code_length, self.output_size = num_table, code_length, output_size
        self.table_size = 2**code_length
        assert hidden_size == num_table * code_length
        self.tables = nn.Parameter(0.02 * torch.randn(num_table * self.table_size, output_size))
        self.bias = nn.Parameter(0.001 * torch.randn(output_size))

    def hash(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory.py:47-60 (``Hashing.forward`` without projection)."""
        batch, _ = x.shape
        return compute_code_score_torch(x.reshape(batch, self.num_table, self.code_length))

    def forward(self, hidden_states: torch.Tensor | None, code_score_shape: tuple | None = None) -> torch.Tensor:
        if code_score_shape is not None:  # memory.py:101-104: Q/K/V reuse one hash
            code, score, other_shape = code_score_shape
        else:
            other_shape = hidden_states.shape[:-1]
            code, score = self.hash(hidden_states.reshape(math.prod(other_shape), -1))
        tables = self.tables.reshape(self.num_table, self.table_size, self.output_size)
        indexes = code.unsqueeze(-1).expand(*code.shape, self.output_size).long()  # memory.py:158
        outputs = tables.permute(1, 0, 2).gather(0, indexes)  # memory.py:160
        outputs = (outputs * score.unsqueeze(-1)).sum(dim=1)  # memory.py:153-154
        return outputs.reshape(*other_shape, self.output_size) + self.bias


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """megatron/model/positional_embeddings.py:98-102."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=x1.ndim - 1)


def rotary_cos_sin(dim: int, seq_len: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positional_embeddings.py:62-71 (``RotaryEmbedding._prepare_cache``), ``[seq, 1, 1, dim]`` as there."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    t = torch.arange(seq_len).type_as(inv_freq)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None, None, :], emb.sin()[:, None, None, :]


class SelfAttention(nn.Module):
    """megatron/model/transformer.py:985-1533 (``MySelfAttention``): Q, K, V Memory Layers sharing the value
    layer's hash (``_forward_memory_qkv``, transformer.py:1416-1429), tables ``small_init``
    (transformer.py:1069, init_functions.py:146-149), partial rotary (transformer.py:1455-1493), causal
    softmax attention scaled by ``1/sqrt(head size)`` (``attention``, transformer.py:1185-1283), no output
    projection (``del_dense``, transformer.py:1170-1172)."""

    def __init__(self, d: int, n_head: int, code_length: int, rotary_pct: float = 0.25) -> None:
        super().__init__()
        self.n_head, self.head_size = n_head, d // n_head
        self.rotary_ndims = int(self.head_size * rotary_pct)  # transformer.py:456
        tables = d // code_length
        self.query_proj = MemoryLayer(d, d, tables, code_length)
        self.key_proj = MemoryLayer(d, d, tables, code_length)
        self.value_proj = MemoryLayer(d, d, tables, code_length)
        with torch.no_grad():
            for layer in (self.query_proj, self.key_proj, self.value_proj):
                layer.tables.normal_(0.0, math.sqrt(2 / (5 * d)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        code, score = self.value_proj.hash(hidden_states.reshape(batch * seq, -1))
        shared = (code, score, (batch, seq))
        q, k, v = (layer(None, shared) for layer in (self.query_proj, self.key_proj, self.value_proj))
        q, k, v = (t.view(batch, seq, self.n_head, self.head_size).transpose(0, 1) for t in (q, k, v))  # [s, b, np, hn]
        cos, sin = rotary_cos_sin(self.rotary_ndims, seq)
        r = self.rotary_ndims
        q = torch.cat(((q[..., :r] * cos) + (rotate_half(q[..., :r]) * sin), q[..., r:]), dim=-1)
        k = torch.cat(((k[..., :r] * cos) + (rotate_half(k[..., :r]) * sin), k[..., r:]), dim=-1)
        scores = torch.einsum("sbnh,tbnh->bnst", q, k) / math.sqrt(self.head_size)
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        context = torch.einsum("bnst,tbnh->bsnh", probs, v)
        return context.reshape(batch, seq, -1)


class Layer(nn.Module):
    """megatron/model/transformer.py:1535-1753 (``ParallelTransformerLayer``): ``input_layernorm`` and
    ``post_attention_layernorm`` are the RMSNorm (transformer.py:1560, 1590); the MLP is
    ``Sequential(MemoryLayer(cfg1), nn.LayerNorm, MemoryLayer(cfg2))`` with two extra bits (transformer.py:
    1611-1630; torch's LayerNorm default eps 1e-5); sequential residuals with ``hidden_dropout``
    (transformer.py:1698-1750)."""

    def __init__(self, d: int, n_head: int, code_length: int, hidden_dropout: float = 0.0) -> None:
        super().__init__()
        tables, extra_bit = d // code_length, 2
        self.input_layernorm = RMSNorm(d)
        self.attention = SelfAttention(d, n_head, code_length)
        self.post_attention_layernorm = RMSNorm(d)
        hidden = tables * (code_length + extra_bit)
        self.mlp = nn.Sequential(
            MemoryLayer(d, hidden, tables, code_length),
            nn.LayerNorm(hidden),
            MemoryLayer(hidden, d, tables, code_length + extra_bit),
        )
        self.hidden_dropout = hidden_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        attention_output = self.attention(self.input_layernorm(x))
        attention_output = nn.functional.dropout(attention_output, p=self.hidden_dropout, training=self.training)
        attention_output = attention_output + residual  # transformer.py:1719
        mlp_output = self.mlp(self.post_attention_layernorm(attention_output))
        mlp_output = nn.functional.dropout(mlp_output, p=self.hidden_dropout, training=self.training)
        return mlp_output + attention_output  # transformer.py:1746


class Model(nn.Module):
    """megatron/model/gpt2_model.py:180-333 (``init_specs`` without weight tying): ``EmbeddingPipe`` (word
    embeddings ``small_init``, then ``embedding_dropout`` with ``hidden_dropout``, word_embeddings.py:58-63,
    110, 156), the layers, the final RMSNorm (``NormPipe``, gpt2_model.py:283-286) and a bias-free
    ``ParallelLinear`` head initialised with ``small_init`` (gpt2_model.py:322-330, transformer.py:306-315)."""

    def __init__(
        self, vocab: int, d: int, n_layer: int, n_head: int, code_length: int, hidden_dropout: float = 0.0
    ) -> None:
        super().__init__()
        std = math.sqrt(2 / (5 * d))
        self.word_embeddings = nn.Embedding(vocab, d)
        self.embedding_dropout = nn.Dropout(hidden_dropout)
        self.layers = nn.ModuleList(Layer(d, n_head, code_length, hidden_dropout) for _ in range(n_layer))
        self.norm = RMSNorm(d)
        self.final_linear = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            self.word_embeddings.weight.normal_(0.0, std)
            self.final_linear.weight.normal_(0.0, std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding_dropout(self.word_embeddings(tokens))
        for layer in self.layers:
            x = layer(x)
        return self.final_linear(self.norm(x))


Getter = Callable[[torch.Tensor], torch.Tensor]


def our_state_from_layer(layer: Layer, prefix: str = "", get: Getter = lambda p: p) -> dict[str, torch.Tensor]:
    """``get(p)`` of the authors' layer's parameters (``p.grad`` for the gradients) under our ``MemoryBlock``'s
    names and shapes (their Q, K, V layers side by side in our one ``qkv``)."""
    attention, (ffn_in, mid, ffn_out) = layer.attention, layer.mlp

    def tables(memory: MemoryLayer) -> torch.Tensor:
        return get(memory.tables).reshape(memory.num_table, memory.table_size, memory.output_size)

    qkv = (attention.query_proj, attention.key_proj, attention.value_proj)
    return {
        f"{prefix}attn_norm.weight": get(layer.input_layernorm.scale),
        f"{prefix}qkv.tables": torch.cat([tables(m) for m in qkv], dim=-1),
        f"{prefix}qkv.bias": torch.cat([get(m.bias) for m in qkv]),
        f"{prefix}ffn_norm.weight": get(layer.post_attention_layernorm.scale),
        f"{prefix}ffn_in.tables": tables(ffn_in),
        f"{prefix}ffn_in.bias": get(ffn_in.bias),
        f"{prefix}ffn_mid_norm.weight": get(mid.weight),
        f"{prefix}ffn_mid_norm.bias": get(mid.bias),
        f"{prefix}ffn_out.tables": tables(ffn_out),
        f"{prefix}ffn_out.bias": get(ffn_out.bias),
    }


def our_state_from_model(model: Model, get: Getter = lambda p: p) -> dict[str, torch.Tensor]:
    """``get(p)`` of the authors' model's parameters under our ``MemoryFormer``'s names and shapes."""
    state = {
        "embed.weight": get(model.word_embeddings.weight),
        "norm.weight": get(model.norm.scale),
        "head.weight": get(model.final_linear.weight),
    }
    for index, layer in enumerate(model.layers):
        state.update(our_state_from_layer(layer, f"blocks.{index}.", get))
    return state


@torch.no_grad()
def load_our_state(module: Layer | Model, state: dict[str, torch.Tensor]) -> None:
    """Sets the authors' ``module`` (a layer, or a model) from our state dict: the inverse of the maps above."""
    views = our_state_from_model(module) if isinstance(module, Model) else our_state_from_layer(module)
    for key, view in views.items():
        if key.endswith("qkv.tables") or key.endswith("qkv.bias"):
            prefix = key.removesuffix("qkv.tables").removesuffix("qkv.bias")
            layer = module.layers[int(prefix.split(".")[1])] if prefix else module
            parts = (layer.attention.query_proj, layer.attention.key_proj, layer.attention.value_proj)
            for part, value in zip(parts, state[key].chunk(3, dim=-1)):
                target = part.tables if key.endswith("tables") else part.bias
                target.copy_(value.reshape(target.shape))
        else:
            view.copy_(state[key].reshape(view.shape))
