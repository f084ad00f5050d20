"""MemoryFormer for Hugging Face transformers: the modeling file ``mf export`` copies into a MemoryFormer folder.

Loaded through ``config.json``'s ``auto_map`` with ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)``; ``AutoConfig`` maps to :class:`MemoryFormerConfig`. This file is shipped as data
and never imported by mf_lightning: it imports only torch and transformers, so a folder works where
mf_lightning is not installed. It computes what mf_lightning's ``MemoryFormer`` computes in inference
(SPEC §2; the weights' names are mf_lightning's), in plain PyTorch: sign hashing of ``code_bits``-wide
chunks (most significant bit first), each table's row weighted by its score (``scaled``: ``sum|z| *
prod sigmoid(2|z|)``, the authors'; ``paper``: the product alone) and summed with ``embedding_bag``,
GPT-NeoX's RMSNorm ``w * x / (rms(x) + eps)``, rotary attention without an output projection, and the
feed-forward ``ML_2(LayerNorm(ML_1(x)))``. ``generate`` recomputes the whole sequence at each step (no KV
cache: ``use_cache`` is off), which is exact and fast enough for evaluation and short generations. Padding
is supported on the right only (what lm-eval's loglikelihood batches use): ``attention_mask`` is not read.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class MemoryFormerConfig(PretrainedConfig):
    """The Hugging Face config of a MemoryFormer: mf_lightning's model config under ``mf_model_config``."""

    model_type = "memoryformer"

    def __init__(self, mf_model_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.mf_model_config = dict(mf_model_config or {})
        values = self.mf_model_config
        self.vocab_size = values.get("vocab_size")
        self.hidden_size = values.get("n_embd")
        self.num_hidden_layers = values.get("n_layer")
        self.num_attention_heads = values.get("n_head")
        self.max_position_embeddings = values.get("max_seq_len")
        kwargs["use_cache"] = False
        kwargs["tie_word_embeddings"] = False  # a tied model reads the embedding as its head itself
        super().__init__(**kwargs)


class GPTNeoXRMSNorm(nn.Module):
    """``weight * (x / (||x||_2 / sqrt(d) + eps))``, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x.float()
        rms = values.norm(2, dim=-1, keepdim=True) * self.weight.shape[0] ** -0.5
        return self.weight * (values / (rms + self.eps)).to(x.dtype)


class HashInput(nn.Module):
    """Subtracts the running mean learnt in training when ``hash_centering`` was on; else the identity."""

    def __init__(self, features: int, centering: bool) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(features) if centering else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.running_mean is None else x - self.running_mean.to(x.dtype)


class MemoryLayer(nn.Module):
    """``in_features -> out_features`` through ``in_features / code_bits`` hashed tables ``[K, 2**code_bits, out]``."""

    def __init__(self, in_features: int, out_features: int, code_bits: int, score: str) -> None:
        super().__init__()
        self.code_bits, self.score = code_bits, score
        self.num_tables = in_features // code_bits
        self.tables = nn.Parameter(torch.zeros(self.num_tables, 2**code_bits, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.unflatten(-1, (self.num_tables, self.code_bits)).float()
        place_values = 2 ** torch.arange(self.code_bits - 1, -1, -1, device=x.device)
        buckets = ((z >= 0).long() * place_values).sum(-1)
        magnitude = z.abs()
        scores = F.logsigmoid(2.0 * magnitude).sum(-1).exp()
        if self.score == "scaled":
            scores = magnitude.sum(-1) * scores
        rows = 2**self.code_bits
        offsets = torch.arange(self.num_tables, device=x.device) * rows
        flat = self.tables.reshape(self.num_tables * rows, -1)
        out = F.embedding_bag(
            (buckets + offsets).flatten(0, -2),
            flat,
            per_sample_weights=scores.flatten(0, -2).to(flat.dtype),
            mode="sum",
        )
        return out.unflatten(0, x.shape[:-1]) + self.bias


def rotary(positions: torch.Tensor, dims: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-NeoX's rotary angles ``[T, dims]`` (the rotated halves side by side)."""
    exponents = torch.arange(0, dims, 2, device=positions.device, dtype=torch.float32) / dims
    angles = positions.float()[:, None] * base ** (-exponents)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dims = cos.shape[-1]
    if dims == 0:
        return x
    rotated, passed = x[..., :dims], x[..., dims:]
    first, second = rotated.chunk(2, dim=-1)
    turned = torch.cat([-second, first], dim=-1)
    return torch.cat([rotated * cos.to(x.dtype) + turned * sin.to(x.dtype), passed], dim=-1)


class MemoryBlock(nn.Module):
    """``x + MHA(ML_qkv(RMSNorm(x)))`` then ``x + ML_2(LayerNorm(ML_1(RMSNorm(x))))``."""

    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        d, bits, score = c["n_embd"], c["code_bits"], c["score"]
        hidden = (d // bits) * (bits + c["ffn_extra_bits"])
        centering = c["hash_centering"]
        self.n_head = c["n_head"]
        self.attn_norm = GPTNeoXRMSNorm(d, c["rms_norm_eps"])
        self.qkv_hash_input = HashInput(d, centering)
        self.qkv = MemoryLayer(d, 3 * d, bits, score)
        self.ffn_norm = GPTNeoXRMSNorm(d, c["rms_norm_eps"])
        self.ffn_in_hash_input = HashInput(d, centering)
        self.ffn_in = MemoryLayer(d, hidden, bits, score)
        self.ffn_mid_norm = nn.LayerNorm(hidden, eps=c["layer_norm_eps"])
        self.ffn_out_hash_input = HashInput(hidden, centering)
        self.ffn_out = MemoryLayer(hidden, d, bits + c["ffn_extra_bits"], score)

    def attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = qkv.shape
        q, k, v = qkv.unflatten(-1, (3, self.n_head, -1)).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1)
        return y.transpose(1, 2).reshape(batch, length, -1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.qkv(self.qkv_hash_input(self.attn_norm(x))), cos, sin)
        hidden = self.ffn_mid_norm(self.ffn_in(self.ffn_in_hash_input(self.ffn_norm(x))))
        return x + self.ffn_out(self.ffn_out_hash_input(hidden))


class MemoryFormerForCausalLM(PreTrainedModel, GenerationMixin):
    """Embedding -> MemoryBlocks -> RMSNorm -> LM head; parameter names as in mf_lightning's ``MemoryFormer``."""

    config_class = MemoryFormerConfig
    base_model_prefix = "memoryformer"
    main_input_name = "input_ids"
    _supports_cache_class = False

    def __init__(self, config: MemoryFormerConfig) -> None:
        super().__init__(config)
        c = config.mf_model_config
        self.embed = nn.Embedding(c["vocab_size"], c["n_embd"])
        self.blocks = nn.ModuleList(MemoryBlock(c) for _ in range(c["n_layer"]))
        self.norm = GPTNeoXRMSNorm(c["n_embd"], c["rms_norm_eps"])
        self.head = None if c["tie_embeddings"] else nn.Linear(c["n_embd"], c["vocab_size"], bias=False)
        head_size = c["n_embd"] // c["n_head"]
        self.rotary_dims = round(head_size * c["rotary_fraction"])
        self.rotary_base = float(c["rotary_base"])
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: every weight comes from the folder's ``model.safetensors``."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = rotary(positions, self.rotary_dims, self.rotary_base)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        head = self.embed.weight if self.head is None else self.head.weight
        logits = F.linear(self.norm(x), head)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict[str, Any]:
        """The whole sequence at every step (no cache)."""
        return {"input_ids": input_ids}


__all__ = ["MemoryFormerConfig", "MemoryFormerForCausalLM"]
