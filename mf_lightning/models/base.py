"""``DecoderLM``: the decoder-only language model base; what MemoryFormer and the baseline Transformer share, so both have one interface.

Token embedding (and dropout), a stack of blocks, a final norm (the one the block puts on the residual
stream) and an LM head (untied by default); no learned positions (rotary inside attention). The embedding
and head are initialised with GPT-NeoX's ``small_init``, as in the MemoryFormer authors' code and Pythia. A subclass names its ``arch``, its ``block_class`` and how many
multiply-accumulates one block spends per token; everything else lives here. Every module holding
parameters or buffers sets all of them in its own ``reset_parameters``, which its constructor calls, so a
model built on the meta device is initialised by :func:`mf_lightning.nn.init.initialise` after allocation
exactly as an eager build is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mf_lightning.checks import positive_int
from mf_lightning.config import ModelConfig
from mf_lightning.models.generation import generate as generate_continuation
from mf_lightning.nn.attention import KVCache, StaticKVCache, rotary_cos_sin
from mf_lightning.nn.blocks import GPTNeoXBlock, MemoryBlock, small_init_std
from mf_lightning.nn.chunked_loss import chunked_cross_entropy
from mf_lightning.nn.layers import NormalEmbedding, NormalLinear

IGNORE_INDEX = -100
BlockRunner = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, "KVCache | StaticKVCache | None"], torch.Tensor
]
"""How :meth:`DecoderLM.hidden_states` runs a block: ``run_block(block, x, cos, sin, cache) -> x``."""


class DecoderLM(nn.Module, ABC):
    """Decoder-only language model over ``config.vocab_size`` tokens, up to ``config.max_seq_len`` long."""

    arch: ClassVar[str]
    block_class: ClassVar[type[MemoryBlock] | type[GPTNeoXBlock]]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != self.arch:
            raise ValueError(f"{type(self).__name__} needs a config with arch={self.arch!r}, got arch={config.arch!r}")
        self.config = config
        std = small_init_std(config.n_embd)
        self.embed = NormalEmbedding(config.vocab_size, config.n_embd, std=std)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(self.block_class(config) for _ in range(config.n_layer))
        self.norm = self.block_class.residual_norm(config)
        self.head = (
            None if config.tie_embeddings else NormalLinear(config.n_embd, config.vocab_size, bias=False, std=std)
        )

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits ``[B, T, vocab]`` of token ids ``idx [B, T]`` and None; or, given ``targets [B, T]``, the mean
        next-token cross-entropy (positions holding -100 are ignored) as the second item.

        With targets and ``config.loss_chunk_size > 0`` the logits are never formed (the head and the loss
        run in chunks of tokens, :mod:`mf_lightning.nn.chunked_loss`) and the first item is None; call
        without targets, or with ``loss_chunk_size=0``, for the logits.
        """
        self.check_tokens(idx)
        if targets is None:
            return self.compute_logits(idx), None
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        hidden = self.hidden_states(idx)
        chunk_size = self.config.loss_chunk_size
        if chunk_size:
            loss = chunked_cross_entropy(
                hidden.flatten(0, 1), self.head_weight, targets.flatten(), chunk_size, IGNORE_INDEX
            )
            return None, loss
        logits = F.linear(hidden, self.head_weight)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's ``[vocab, n_embd]`` weight: the token embedding's when tied."""
        return self.embed.weight if self.head is None else self.head.weight

    def compute_logits(
        self,
        idx: torch.Tensor,
        kv_caches: Sequence[KVCache | StaticKVCache] | None = None,
        run_block: BlockRunner | None = None,
    ) -> torch.Tensor:
        """Logits of ``idx [B, T]``, placed after the positions already in ``kv_caches`` (one per block)."""
        return F.linear(self.hidden_states(idx, kv_caches, run_block), self.head_weight)

    def hidden_states(
        self,
        idx: torch.Tensor,
        kv_caches: Sequence[KVCache | StaticKVCache] | None = None,
        run_block: BlockRunner | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states ``[B, T, n_embd]`` of ``idx``, the LM head's input.

        ``run_block(block, x, cos, sin, cache)`` runs each block (default: calls it), so decoding can run
        the blocks through a compiled step (:mod:`mf_lightning.models.decode_step`).
        """
        if kv_caches is None:
            positions = torch.arange(idx.shape[1], device=idx.device)
        else:
            positions = kv_caches[0].next_positions(idx.shape[1], idx.device)
        cos, sin = rotary_cos_sin(positions, self.config.rotary_dims, self.config.rotary_base)
        x = self.embed_dropout(self.embed(idx))
        for block, cache in zip(self.blocks, kv_caches or [None] * len(self.blocks)):
            x = block(x, cos, sin, cache) if run_block is None else run_block(block, x, cos, sin, cache)
        return self.norm(x)

    def new_kv_caches(self, max_len: int) -> list[KVCache]:
        """One empty KV cache per block, each holding ``max_len`` positions."""
        return [KVCache(max_len) for _ in self.blocks]

    def check_tokens(self, idx: torch.Tensor) -> None:
        """Reject token ids that are not an integer ``[B, T]`` tensor with ``1 <= T <= max_seq_len``."""
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must be an int64 or int32 tensor of token ids, got {describe(idx)}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must have shape [batch, seq_len] with seq_len >= 1, got {tuple(idx.shape)}")
        if idx.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {idx.shape[1]} tokens is longer than max_seq_len={self.config.max_seq_len}; "
                "truncate it or build the model with a larger max_seq_len"
            )

    def generate(
        self,
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
        """Continue each prompt row of ``idx [B, T]``; see :func:`mf_lightning.models.generation.generate`."""
        return generate_continuation(
            self, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator, compile
        )

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameter values; ``exclude_embeddings`` leaves out the token embedding table
        (a lookup, not compute; the LM head stays in, so for the baseline ``6 * N`` ~ training FLOPs)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embeddings else total

    def flops_per_token(self, seq_len: int, training: bool = True) -> int:
        """Analytical FLOPs per token for sequences of ``seq_len`` tokens.

        ``FLOPs = 2 * MACs``, ``MACs = n_layer * block_macs_per_token(seq_len) + n_embd * vocab_size``
        (the LM head); training counts ``3x`` the forward (backward = 2x forward). The embedding lookup,
        norms, softmax, rotary and the Memory Layers' hashing and scores are elementwise and not
        counted, as in the paper (SPEC §3).
        """
        positive_int("seq_len", seq_len)
        config = self.config
        macs = config.n_layer * self.block_macs_per_token(seq_len) + config.n_embd * config.vocab_size
        return 2 * macs * (3 if training else 1)

    @abstractmethod
    def block_macs_per_token(self, seq_len: int, attention: bool = True) -> int:
        """Multiply-accumulates of one block per token; ``attention=False`` leaves out ``2 * seq_len * d``."""

    def attention_macs_per_token(self, seq_len: int) -> int:
        """``Q K^T`` and ``softmax(.) V`` over all ``seq_len`` positions: ``2 * seq_len * d`` (the paper's
        ``2 s^2 d`` per block for ``s`` tokens, which counts the full square, not the causal half)."""
        return 2 * seq_len * self.config.n_embd

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``; see :mod:`.pretrained`."""
        # Imported here: pretrained imports the architectures, which import this module.
        from mf_lightning.models.pretrained import save_pretrained

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu") -> DecoderLM:
        """Load a model saved by :meth:`save_pretrained`; on a subclass, the saved arch must be that class's."""
        from mf_lightning.models.pretrained import load_pretrained

        return load_pretrained(directory, device, arch=getattr(cls, "arch", None))


def describe(value: object) -> str:
    """Short description of a value for error messages: a tensor's dtype and shape, else its type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
