"""The model architectures: MemoryFormer, the baseline Transformer, and ``build_model`` to pick one by ``arch``.

Both are a :class:`~mf_lightning.models.base.DecoderLM` (embedding -> ``n_layer`` blocks -> norm -> LM
head) and differ only in their block and in how many multiply-accumulates it spends per token. A new
architecture is a ``DecoderLM`` subclass here naming its ``arch`` and ``block_class`` (built in
:mod:`mf_lightning.nn.blocks`), added to :data:`MODELS`.
"""

from __future__ import annotations

from mf_lightning.config import ModelConfig
from mf_lightning.models.base import DecoderLM
from mf_lightning.nn.blocks import GPTNeoXBlock, MemoryBlock


class MemoryFormer(DecoderLM):
    """MemoryFormer (Ding et al., NeurIPS 2024): a decoder whose every fully-connected layer is a Memory Layer.

    Embedding -> ``n_layer`` x :class:`~mf_lightning.nn.blocks.MemoryBlock` -> GPT-NeoX RMSNorm -> LM head, as
    the authors' GPT-NeoX fork computes it (tests/models/authors_reference.py transcribes it). The
    embedding and head stay ordinary (SPEC §2); everything between them hashes instead of multiplying.
    Build it with ``MemoryFormer(ModelConfig.from_preset("tiny"))``.
    """

    arch = "memoryformer"
    block_class = MemoryBlock

    def block_macs_per_token(self, seq_len: int, attention: bool = True) -> int:
        """Table rows accumulated per token plus attention.

        A Memory Layer with ``K`` tables and output width ``n`` adds ``K`` scaled rows: ``K * n``
        multiply-adds. Per block: Q/K/V ``K * 3d``, ``ML_1`` ``K * K(tau+2)``, ``ML_2`` (again ``K``
        tables, of ``tau+2`` bits) ``K * d``; in total ``K * (4d + K(tau+2)) = 5.25 K d`` at ``tau = 8``.
        The paper's Table 1 rounds the feed-forward's share up and counts ``6 K d`` (SPEC §3), 12.5% more.
        """
        config = self.config
        macs = config.num_tables * (4 * config.n_embd + config.ffn_hidden)
        return macs + (self.attention_macs_per_token(seq_len) if attention else 0)


class Transformer(DecoderLM):
    """The baseline: Pythia (GPT-NeoX) at the same widths and depths as MemoryFormer (SPEC §2).

    Embedding -> ``n_layer`` x :class:`~mf_lightning.nn.blocks.GPTNeoXBlock` -> LayerNorm -> LM head,
    computing what ``transformers.GPTNeoXForCausalLM`` computes with Pythia's config (so its weights map
    one to one, :mod:`mf_lightning.models.gpt_neox`): parallel residual, fused QKV and output projections,
    a GELU feed-forward of width ``ffn_multiplier * d``, rotary attention.
    Build it with ``Transformer(ModelConfig.from_preset("tiny", arch="transformer"))``.
    """

    arch = "transformer"
    block_class = GPTNeoXBlock

    def block_macs_per_token(self, seq_len: int, attention: bool = True) -> int:
        """Weights used per token plus attention: QKV ``3d^2``, output ``d^2``, FFN ``2 d h``
        (``12 d^2`` at ``h = 4d``, the paper's standard block, SPEC §3)."""
        d = self.config.n_embd
        macs = 4 * d * d + 2 * d * self.config.ffn_hidden
        return macs + (self.attention_macs_per_token(seq_len) if attention else 0)


MODELS: dict[str, type[DecoderLM]] = {cls.arch: cls for cls in (MemoryFormer, Transformer)}


def build_model(config: ModelConfig) -> DecoderLM:
    """The model ``config.arch`` names, built from ``config`` (on the current default device)."""
    if config.arch not in MODELS:
        raise ValueError(f"unknown arch {config.arch!r}; valid: {', '.join(MODELS)}")
    return MODELS[config.arch](config)
