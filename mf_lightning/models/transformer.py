"""The Pythia-style baseline Transformer at the same widths and depths as MemoryFormer (SPEC §2).

Embedding -> ``n_layer`` x :class:`~mf_lightning.nn.blocks.TransformerBlock` -> RMSNorm -> LM head:
QKV and output projections, a GELU feed-forward of width ``ffn_multiplier * d``, rotary attention.
"""

from __future__ import annotations

from mf_lightning.models.base import DecoderLM
from mf_lightning.nn.blocks import TransformerBlock


class Transformer(DecoderLM):
    """Baseline language model; build it with ``Transformer(ModelConfig.from_preset("tiny", arch="transformer"))``."""

    arch = "transformer"
    block_class = TransformerBlock

    def block_macs_per_token(self, seq_len: int, attention: bool = True) -> int:
        """Weights used per token plus attention: QKV ``3d^2``, output ``d^2``, FFN ``2 d h``
        (``12 d^2`` at ``h = 4d``, the paper's standard block, SPEC §3)."""
        d = self.config.n_embd
        macs = 4 * d * d + 2 * d * self.config.ffn_hidden
        return macs + (self.attention_macs_per_token(seq_len) if attention else 0)
