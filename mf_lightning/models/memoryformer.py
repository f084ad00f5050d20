"""MemoryFormer (Ding et al., NeurIPS 2024): a decoder whose every fully-connected layer is a Memory Layer.

Embedding -> ``n_layer`` x :class:`~mf_lightning.nn.blocks.MemoryBlock` -> RMSNorm -> LM head. The
embedding and head stay ordinary (SPEC §2); everything between them hashes instead of multiplying.
"""

from __future__ import annotations

from mf_lightning.models.base import DecoderLM
from mf_lightning.nn.blocks import MemoryBlock


class MemoryFormer(DecoderLM):
    """MemoryFormer language model; build it with ``MemoryFormer(ModelConfig.from_preset("tiny"))``."""

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
