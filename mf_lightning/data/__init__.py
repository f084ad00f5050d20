"""Corpora, tokenizers, the token cache and the ``TextDataModule`` that serves them to Lightning.

Names are imported on first use, so that the worker processes that tokenize a corpus
(``mf_lightning.data.workers``) import only what they need, not Lightning and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

EXPORTS = {
    "Source": "mf_lightning.data.sources",
    "open_source": "mf_lightning.data.sources",
    "TextDataModule": "mf_lightning.data.datamodule",
    "TokenCache": "mf_lightning.data.cache",
    "prepare_token_cache": "mf_lightning.data.cache",
    "Tokenizer": "mf_lightning.data.tokenizers",
    "load_tokenizer": "mf_lightning.data.tokenizers",
}
__all__ = sorted(EXPORTS)  # noqa: PLE0605 (a list, built from the lazy table)


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(EXPORTS[name]), name)
