"""One part of a corpus tokenized into a part file: the unit of parallel, resumable preparation.

A part's tokens (each document's ids followed by EOS) go to ``<index>.bin``, and each document's token
count and UTF-8 size to ``<index>.docs.npy``; both are written atomically (``mf_lightning.fs.atomic``), and
``<index>.done`` (what the part is, and its sizes) is written last, the same way, so a part counts as finished only
when all of it is on disk: a preparation killed at any moment leaves finished parts that are reused and
an unfinished one that is redone. Which split each document goes to is decided later, when the parts
are merged in order into the cache (``cache``), because it depends on the document's index in the
whole corpus. Every write is wrapped in ``faults.writing``, so a part file that cannot be written (a full
disk) is an error naming it, told apart from an error of reading the part's documents.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mf_lightning.data.faults import writing
from mf_lightning.data.sources import Cursor, Part, Source
from mf_lightning.data.tokenizers import Tokenizer
from mf_lightning.fs.atomic import atomic_file, write_atomic

ENCODE_BATCH_DOCUMENTS = 256
WRITING_PART = "writing a part of the token cache"
Report = Callable[[int, int], None]
"""Called with (units of the part read so far, documents in the batch just written)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids (at most {2**32})")


def part_files(folder: Path, index: int) -> tuple[Path, Path, Path]:
    """The tokens, document sizes and completion marker of part ``index``."""
    stem = folder / f"{index:07d}"
    return stem.with_suffix(".bin"), stem.with_suffix(".docs.npy"), stem.with_suffix(".done")


def tokenize_part(source: Source, tokenizer: Tokenizer, part: Part, folder: Path, report: Report) -> None:
    """Writes the tokens of ``part``'s documents into ``folder`` (see the module), reporting after every batch."""
    dtype = token_dtype(tokenizer.vocab_size)
    tokens_file, sizes_file, done_file = part_files(folder, part.index)
    cursor = Cursor()
    documents = source.part_documents(part, cursor)
    sizes: list[tuple[int, int]] = []
    chunks: list[bytes] = []
    while batch := list(itertools.islice(documents, ENCODE_BATCH_DOCUMENTS)):
        flat: list[int] = []
        for document, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
            flat.extend(ids)
            flat.append(tokenizer.eos_id)
            sizes.append((len(ids) + 1, len(document.encode("utf-8"))))
        chunks.append(token_bytes(flat, dtype, tokenizer.vocab_size))
        report(cursor.position, len(batch))
    table = io.BytesIO()
    np.save(table, np.asarray(sizes, dtype=np.int64).reshape(-1, 2))
    with writing(tokens_file):
        with atomic_file(tokens_file, WRITING_PART) as output:
            for chunk in chunks:
                output.write(chunk)
        write_atomic(sizes_file, table.getvalue(), WRITING_PART)
        marker = {"part": asdict(part), "documents": len(sizes), "token_bytes": tokens_file.stat().st_size}
        write_atomic(done_file, json.dumps(marker), WRITING_PART)


def is_finished(folder: Path, part: Part) -> bool:
    """Whether ``folder`` holds the whole of ``part`` (its marker, matching this part, and both files of its sizes)."""
    tokens_file, sizes_file, done_file = part_files(folder, part.index)
    try:
        marker = json.loads(done_file.read_text(encoding="utf-8"))
        return (
            marker["part"] == json.loads(json.dumps(asdict(part)))
            and tokens_file.stat().st_size == marker["token_bytes"]
            and len(read_sizes(folder, part.index)) == marker["documents"]
            and sizes_file.is_file()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def read_sizes(folder: Path, index: int) -> np.ndarray:
    """Part ``index``'s documents as rows ``(tokens with EOS, UTF-8 bytes)``."""
    return np.load(part_files(folder, index)[1])


def read_tokens(folder: Path, index: int, dtype: np.dtype) -> np.ndarray:
    """Part ``index``'s tokens."""
    return np.fromfile(part_files(folder, index)[0], dtype=dtype)


def token_bytes(ids: list[int], dtype: np.dtype, vocab_size: int) -> bytes:
    """``ids`` as ``dtype`` bytes, refusing ids outside ``[0, vocab_size)``."""
    array = np.asarray(ids, dtype=np.int64)
    outside = array[(array < 0) | (array >= vocab_size)]
    if outside.size:
        raise ValueError(f"the tokenizer produced id {outside[0]} outside its vocabulary [0, {vocab_size})")
    return array.astype(dtype).tobytes()
