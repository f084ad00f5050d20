"""The token cache: a corpus tokenized once into flat ``train.bin`` / ``val.bin`` / ``test.bin`` memmaps plus a manifest.

Documents are split deterministically by index (:func:`document_split`: document 0 and then one in every
``1/val_fraction`` go to validation, then the first remaining document and one in every
``1/test_fraction`` of all go to test), tokenized, and appended with an EOS after each. Ids are stored as ``uint16`` when
the vocabulary fits (ids < 65536), else ``uint32``. The cache folder is named by a hash of everything
the tokens depend on (source identity, tokenizer fingerprint, validation and test fractions, format version),
written in a temporary folder and renamed into place, so an interrupted preparation leaves no half
cache. A cache that fails its checks (manifest disagreeing, a ``.bin`` whose length disagrees with
the manifest, an id outside the vocabulary) is logged and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mf_lightning.data.sources import Source
from mf_lightning.data.tokenizers import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
ENCODE_BATCH_DOCUMENTS = 256
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TokenCache:
    """A prepared cache folder and its manifest."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def path(self, split: str) -> Path:
        """The ``.bin`` file of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        return self.directory / f"{split}.bin"

    def num_tokens(self, split: str) -> int:
        return self.manifest["splits"][split]["tokens"]

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of the split's documents per stored token (EOS tokens included)."""
        stats = self.manifest["splits"][split]
        return stats["bytes"] / stats["tokens"]

    def open(self, split: str) -> np.memmap:
        """The split's tokens as a read-only memmap."""
        return np.memmap(self.path(split), dtype=self.dtype, mode="r")


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids (at most {2**32})")


def is_validation(index: int, val_fraction: float) -> bool:
    """Whether document ``index`` goes to validation: document 0, then one in every ``1/val_fraction``."""
    return index == 0 or math.floor(index * val_fraction) > math.floor((index - 1) * val_fraction)


def document_split(index: int, val_fraction: float, test_fraction: float) -> str:
    """``"val"``, ``"test"`` or ``"train"`` for document ``index``.

    Validation is exactly :func:`is_validation` (so validation documents do not depend on
    ``test_fraction``); the test documents are taken from the rest, the first of them and then one in
    every ``(1 - val_fraction) / test_fraction``, so ``test_fraction`` of all documents (none at 0).
    """
    if is_validation(index, val_fraction):
        return "val"
    rest = index - 1 - math.floor((index - 1) * val_fraction)  # earlier documents not in validation
    if test_fraction > 0 and is_validation(rest, test_fraction / (1 - val_fraction)):
        return "test"
    return "train"


def cache_key(source: Source, tokenizer: Tokenizer, val_fraction: float, test_fraction: float) -> dict[str, Any]:
    """Everything the cached tokens depend on."""
    return {
        "format_version": FORMAT_VERSION,
        "source": source.identity,
        "tokenizer": tokenizer.fingerprint,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
    }


def prepare_token_cache(
    source: Source, tokenizer: Tokenizer, cache_root: str | os.PathLike, val_fraction: float, test_fraction: float = 0.0
) -> TokenCache:
    """The valid token cache for this corpus under ``cache_root/tokens``, built (or rebuilt) if needed."""
    check_fractions(val_fraction, test_fraction)
    key = cache_key(source, tokenizer, val_fraction, test_fraction)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    directory = Path(cache_root) / "tokens" / digest
    problem = cache_problem(directory, key, tokenizer.vocab_size)
    if problem is None:
        return TokenCache(directory, read_manifest(directory))
    if directory.exists():
        log.warning("rebuilding token cache %s: %s", directory, problem)
    else:
        log.info("tokenizing the corpus into %s", directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=directory.parent))
    try:
        write_cache(temp, source, tokenizer, key)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(temp, directory)
    except OSError:
        if cache_problem(directory, key, tokenizer.vocab_size) is not None:
            raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return TokenCache(directory, read_manifest(directory))


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raises naming the fractions unless ``0 < val_fraction``, ``0 <= test_fraction`` and some training data is left."""
    if not 0.0 < val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction must be in (0, 1), test_fraction in [0, 1), and together below 1 so that documents "
            f"are left for training; got val_fraction={val_fraction}, test_fraction={test_fraction}"
        )


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))


def cache_problem(directory: Path, key: dict[str, Any], vocab_size: int) -> str | None:
    """Why the cache in ``directory`` cannot be used, or ``None`` when it is valid."""
    try:
        manifest = read_manifest(directory)
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError) as error:
        return f"unreadable manifest ({error})"
    for name, value in key.items():
        if manifest.get(name) != value:
            return f"manifest {name} is {manifest.get(name)!r}, expected {value!r}"
    if manifest.get("vocab_size") != vocab_size:
        return f"manifest vocab_size is {manifest.get('vocab_size')}, the tokenizer has {vocab_size}"
    cache = TokenCache(directory, manifest)
    for split in SPLITS:
        expected = cache.num_tokens(split) * cache.dtype.itemsize
        size = cache.path(split).stat().st_size if cache.path(split).is_file() else None
        if size != expected:
            return f"{cache.path(split).name} has {size} bytes, the manifest says {expected}"
        largest = int(cache.open(split).max()) if expected else 0  # test.bin is empty without a test split
        if largest >= vocab_size:
            return f"{cache.path(split).name} holds token id {largest} >= vocab_size {vocab_size}"
    return None


def write_cache(directory: Path, source: Source, tokenizer: Tokenizer, key: dict[str, Any]) -> None:
    """Tokenizes every document of ``source`` into ``directory``; the manifest is written last."""
    dtype = token_dtype(tokenizer.vocab_size)
    stats = {split: {"documents": 0, "tokens": 0, "bytes": 0} for split in SPLITS}
    files = {split: (directory / f"{split}.bin").open("wb") for split in SPLITS}
    try:
        for index, document, ids in tokenized(source, tokenizer):
            split = document_split(index, key["val_fraction"], key["test_fraction"])
            ids.append(tokenizer.eos_id)
            append_tokens(files[split], ids, dtype, tokenizer.vocab_size)
            stats[split]["documents"] += 1
            stats[split]["tokens"] += len(ids)
            stats[split]["bytes"] += len(document.encode("utf-8"))
    finally:
        for file in files.values():
            file.close()
    counts = {split: stats[split]["documents"] for split in SPLITS}
    if min(counts[split] for split in SPLITS if split != "test" or key["test_fraction"] > 0) == 0:
        raise ValueError(
            f"the corpus has {sum(counts.values())} document(s), split {counts} with val_fraction="
            f"{key['val_fraction']}, test_fraction={key['test_fraction']}: each split needs at least one; add documents (several files instead of one), "
            "or cut plain-text files into documents with data.document_separator (e.g. '' for blank lines)"
        )
    vocabulary = {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "dtype": dtype.name}
    manifest = {**key, **vocabulary, "splits": stats}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def tokenized(source: Source, tokenizer: Tokenizer) -> Iterator[tuple[int, str, list[int]]]:
    """``(index, document, ids)`` for every document, encoded in batches."""
    documents = source.documents()
    index = 0
    while batch := list(itertools.islice(documents, ENCODE_BATCH_DOCUMENTS)):
        for document, ids in zip(batch, tokenizer.encode_batch(batch)):
            yield index, document, ids
            index += 1


def append_tokens(file: BinaryIO, ids: list[int], dtype: np.dtype, vocab_size: int) -> None:
    """Writes ``ids`` to ``file`` as ``dtype``, refusing ids outside ``[0, vocab_size)``."""
    array = np.asarray(ids, dtype=np.int64)
    outside = array[(array < 0) | (array >= vocab_size)]
    if outside.size:
        raise ValueError(f"the tokenizer produced id {outside[0]} outside its vocabulary [0, {vocab_size})")
    array.astype(dtype).tofile(file)
