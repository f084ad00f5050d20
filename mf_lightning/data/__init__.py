"""Corpora, tokenizers, the token cache and the ``TextDataModule`` that serves them to Lightning."""

from mf_lightning.data.cache import TokenCache, prepare_token_cache
from mf_lightning.data.datamodule import TextDataModule
from mf_lightning.data.sources import Source, open_source
from mf_lightning.data.tokenizers import Tokenizer, load_tokenizer

__all__ = [
    "Source",
    "TextDataModule",
    "TokenCache",
    "Tokenizer",
    "load_tokenizer",
    "open_source",
    "prepare_token_cache",
]
