"""The token cache: a corpus tokenized once into flat ``train.bin`` / ``val.bin`` / ``test.bin`` memmaps plus a manifest.

Documents are split deterministically by index (:func:`document_split`: document 0 and then one in every
``1/val_fraction`` go to validation, then the first remaining document and one in every
``1/test_fraction`` of all go to test), tokenized, and appended with an EOS after each. Ids are stored as ``uint16`` when
the vocabulary fits (ids < 65536), else ``uint32``. The cache folder is named by a hash of everything
the tokens depend on (source identity, tokenizer fingerprint, validation and test fractions, format
version).

Building: the source is cut into parts of about ``PART_BYTES`` (``sources``), which worker processes
tokenize into a hidden parts folder beside the cache (``workers``, ``parts``); the finished parts are
then merged in order into the split files, in a staging folder swapped into place
(``mf_lightning.fs.folders``). The result does not depend on the number of workers. The parts folder
stays until the cache is in place, so a killed build resumes from its finished parts; a lock file beside
the cache (``mf_lightning.fs.lock``) makes the processes of one job build it once, the others waiting and
then checking it. Parts that can never be resumed, of a corpus that changed since, are removed by the next
build beside them (``leftovers``), and a build that finds its corpus changed while it was tokenized removes
its own. A cache file that cannot be written is one error naming it and what to do (``faults``).

The manifest records a CRC-32 of every ``CHUNK_BYTES`` of each ``.bin`` and the file's modification
time. Opening a cache checks the manifest's shape and values, the file sizes, and the checksums of
the first, the last and ``SAMPLED_CHUNKS`` random chunks; a file modified since it was written (or
every file, with ``verify=True``: ``data.verify_cache``) is checked in full, and its new time recorded when it passes.
A cache that fails is logged with the reason and rebuilt, never used. The chunks the opening check
did not read are checked in the background while training runs (``verification``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mf_lightning.data.faults import CacheWriteError, unwritable, writing
from mf_lightning.data.leftovers import TOKENS, lock_file, parts_folder, record_key, remove_unresumable
from mf_lightning.data.parts import is_finished, read_sizes, read_tokens, token_dtype
from mf_lightning.data.progress import Progress
from mf_lightning.data.sources import Part, Source
from mf_lightning.data.tokenizers import Tokenizer
from mf_lightning.data.workers import tokenize_parts
from mf_lightning.fs.atomic import remove_abandoned, write_atomic
from mf_lightning.fs.folders import replaced_folder
from mf_lightning.fs.lock import FileLock

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
SPLITS = ("train", "val", "test")
SPLIT_STATS = ("documents", "tokens", "bytes")
PART_BYTES = 8 << 20
MANIFEST = "manifest.json"
CHUNK_BYTES = 16 << 20
SAMPLED_CHUNKS = 2


@dataclass(frozen=True)
class TokenCache:
    """A prepared cache folder and its manifest; ``built`` when this process wrote it, ``verified`` when every chunk
    was checked (or written) by this process."""

    directory: Path
    manifest: dict[str, Any]
    verified: bool = field(default=False, compare=False)
    built: bool = field(default=False, compare=False)

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

    @property
    def content_digest(self) -> str:
        """A digest of the tokens this cache serves: the tokenizer, fractions, counts and every chunk's checksum, not
        the files' times nor the source's identity (a copy of the corpus on another node has other times). Two
        caches with one digest train on the same windows; ranks compare it to find caches that differ."""
        content = {name: value for name, value in self.manifest.items() if name not in ("source", "checksums")}
        content["crc32"] = {split: self.manifest["checksums"][split]["crc32"] for split in SPLITS}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


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
    source: Source,
    tokenizer: Tokenizer,
    cache_root: str | os.PathLike,
    val_fraction: float,
    test_fraction: float = 0.0,
    workers: int | None = None,
    verify: bool = False,
) -> TokenCache:
    """The valid token cache for this corpus under ``cache_root/tokens``, built (or rebuilt) if needed.

    ``verify`` checks every chunk of a cache found on disk now, instead of a sample now and the rest in the
    background (``verification``); the cache returned is then marked verified.

    ``workers`` processes tokenize the corpus (default: every core this process may use). Processes of one
    job that ask at once (DDP ranks, nodes sharing the cache folder) build it once: one builds, the others
    wait and then check what it built (``mf_lightning.fs.lock``).
    """
    check_fractions(val_fraction, test_fraction)
    key = cache_key(source, tokenizer, val_fraction, test_fraction)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    directory = Path(cache_root) / TOKENS / digest
    problem = cache_problem(directory, key, tokenizer, verify)
    if problem is None:
        return TokenCache(directory, read_manifest(directory), verified=verify)
    with FileLock(lock_file(directory), f"the token cache {directory}"):
        problem = cache_problem(directory, key, tokenizer, verify)  # another process may have built it meanwhile
        if problem is None:
            return TokenCache(directory, read_manifest(directory), verified=verify)
        if directory.exists():
            log.warning("rebuilding token cache %s: %s", directory, problem)
        else:
            log.info("tokenizing the corpus into %s", directory)
        build_cache(directory, source, tokenizer, key, default_workers() if workers is None else workers)
    return TokenCache(directory, read_manifest(directory), verified=True, built=True)


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_cache(directory: Path, source: Source, tokenizer: Tokenizer, key: dict[str, Any], workers: int) -> None:
    """Tokenizes the corpus part by part into a parts folder beside ``directory`` (kept until the cache is in place,
    so a killed build resumes), then merges the parts into the cache, built in a staging folder and moved into place."""
    started = time.monotonic()
    folder = parts_folder(directory)
    try:
        with writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
            record_key(folder, key)
    except CacheWriteError as error:
        raise unwritable(error.errno, error.strerror, error.filename) from error
    remove_abandoned(folder)
    remove_unresumable(directory.parent.parent, keep=folder)
    parts = source.parts(PART_BYTES)
    todo = [part for part in parts if not is_finished(folder, part)]
    if len(todo) < len(parts):
        log.info("resuming: %d of %d parts were tokenized before, in %s", len(parts) - len(todo), len(parts), folder)
    total, remaining = sum(part.size for part in parts), sum(part.size for part in todo)
    progress = Progress("tokenizing the corpus", total, done=total - remaining)
    try:
        tokenize_parts(source, tokenizer, todo, folder, workers, progress)
    finally:
        progress.close()
    change = source.change()
    if change is not None:
        shutil.rmtree(folder, ignore_errors=True)  # tokens of a corpus that no longer exists: never to be resumed
        raise ValueError(f"the corpus changed while it was being tokenized ({change}); run again once it is complete")
    try:
        with writing(directory), replaced_folder(directory, "writing the token cache") as staged:
            stats = merge_parts(folder, parts, staged, tokenizer, key)
    except CacheWriteError as error:
        merge_again = f"run the same preparation again to merge the {len(parts)} tokenized part(s) kept in {folder}"
        raise unwritable(error.errno, error.strerror, error.filename, merge_again) from error
    shutil.rmtree(folder, ignore_errors=True)
    documents = sum(stats[split]["documents"] for split in SPLITS)
    tokens = sum(stats[split]["tokens"] for split in SPLITS)
    log.info("tokenized %d documents into %d tokens in %.0f s", documents, tokens, time.monotonic() - started)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raises naming the fractions unless ``0 < val_fraction``, ``0 <= test_fraction`` and some training data is left."""
    if not 0.0 < val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction must be in (0, 1), test_fraction in [0, 1), and together below 1 so that documents "
            f"are left for training; got val_fraction={val_fraction}, test_fraction={test_fraction}"
        )


def read_manifest(directory: Path) -> Any:
    return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))


def cache_problem(directory: Path, key: dict[str, Any], tokenizer: Tokenizer, full: bool = False) -> str | None:
    """Why the cache in ``directory`` cannot be used, or ``None`` when it is valid.

    ``full`` checks every chunk of both files; otherwise only those of a file modified since it was
    written, and a sample of the others.
    """
    try:
        manifest = read_manifest(directory)
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError) as error:
        return f"unreadable manifest ({error})"
    problem = manifest_problem(manifest, key, tokenizer)
    if problem is not None:
        return problem
    cache = TokenCache(directory, manifest)
    for split in SPLITS:
        problem = content_problem(cache, split, full)
        if problem is not None:
            return problem
    restamp(cache)
    return None


def restamp(cache: TokenCache) -> None:
    """Records the current modification times of files that were modified but checked whole and intact
    (touched, copied), so later opens sample them again; a cache that cannot be written is left as is."""
    stamps = cache.manifest["checksums"]
    mtimes = {split: cache.path(split).stat().st_mtime_ns for split in SPLITS}
    if all(stamps[split]["mtime_ns"] == mtimes[split] for split in SPLITS):
        return
    for split in SPLITS:
        stamps[split]["mtime_ns"] = mtimes[split]
    with contextlib.suppress(OSError):
        write_atomic(cache.directory / MANIFEST, json.dumps(cache.manifest, indent=2), "recording the cache's times")


def manifest_problem(manifest: Any, key: dict[str, Any], tokenizer: Tokenizer) -> str | None:
    """What is wrong with a manifest's shape or values for this key and tokenizer, or ``None``."""
    if not isinstance(manifest, dict):
        return f"the manifest holds a {type(manifest).__name__}, not an object"
    expected = {
        **key,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
    }
    for name, value in expected.items():
        if manifest.get(name) != value:
            return f"manifest {name} is {manifest.get(name)!r}, expected {value!r}"
    splits, checksums = manifest.get("splits"), manifest.get("checksums")
    if not isinstance(splits, dict) or not isinstance(checksums, dict) or not is_count(checksums.get("chunk_bytes")):
        return "the manifest lacks its splits or checksums"
    for split in SPLITS:
        stats, sums = splits.get(split), checksums.get(split)
        least = 0 if split == "test" else 1  # the test split is empty when data.test_fraction is 0
        if not isinstance(stats, dict) or not all(is_count(stats.get(name), least) for name in SPLIT_STATS):
            return f"manifest splits.{split} is {stats!r}, expected counts >= {least} of {', '.join(SPLIT_STATS)}"
        sums = sums if isinstance(sums, dict) else {}
        if not isinstance(sums.get("crc32"), list) or not isinstance(sums.get("mtime_ns"), int):
            return f"manifest checksums.{split} is not an object with crc32 and mtime_ns"
        chunks = math.ceil(stats["tokens"] * np.dtype(expected["dtype"]).itemsize / checksums["chunk_bytes"])
        if len(sums["crc32"]) != chunks or not all(isinstance(crc, int) for crc in sums["crc32"]):
            return f"manifest checksums.{split} has {len(sums['crc32'])} entries, expected {chunks} integers"
    return None


def is_count(value: Any, least: int = 1) -> bool:
    """Whether ``value`` is an int >= ``least`` (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def content_problem(cache: TokenCache, split: str, full: bool) -> str | None:
    """Whether ``split``'s file has the manifest's size and checksums (all chunks, or a sample; see the module)."""
    path = cache.path(split)
    expected = cache.num_tokens(split) * cache.dtype.itemsize
    stat = path.stat() if path.is_file() else None
    if stat is None or stat.st_size != expected:
        return f"{path.name} has {stat and stat.st_size} bytes, the manifest says {expected}"
    chunk_bytes = cache.manifest["checksums"]["chunk_bytes"]
    recorded = cache.manifest["checksums"][split]
    modified = stat.st_mtime_ns != recorded["mtime_ns"]
    with path.open("rb") as file:
        for index in checked_chunks(len(recorded["crc32"]), full or modified):
            file.seek(index * chunk_bytes)
            if zlib.crc32(file.read(chunk_bytes)) != recorded["crc32"][index]:
                start = index * chunk_bytes
                return f"{path.name} bytes {start}..{min(start + chunk_bytes, expected)} differ from their checksum"
    return None


def checked_chunks(count: int, full: bool) -> list[int]:
    """Indices of the chunks to check: all, or the first, the last and ``SAMPLED_CHUNKS`` others at random."""
    if full or count <= SAMPLED_CHUNKS + 2:
        return list(range(count))
    return sorted({0, count - 1, *random.Random().sample(range(1, count - 1), SAMPLED_CHUNKS)})


class ChecksummedWriter:
    """Writes a file front to back, computing a CRC-32 of every ``chunk_bytes`` bytes on the way."""

    def __init__(self, path: Path, chunk_bytes: int) -> None:
        self.file = path.open("wb")
        self.chunk_bytes = chunk_bytes
        self.checksums: list[int] = []
        self.crc = 0
        self.filled = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        view = memoryview(data)
        while view:
            taken = view[: self.chunk_bytes - self.filled]
            self.crc = zlib.crc32(taken, self.crc)
            self.filled += len(taken)
            view = view[len(taken) :]
            if self.filled == self.chunk_bytes:
                self.checksums.append(self.crc)
                self.crc, self.filled = 0, 0

    def close(self) -> dict[str, Any]:
        """Closes the file; returns its checksums and modification time as recorded in the manifest."""
        self.file.close()
        if self.filled:
            self.checksums.append(self.crc)
            self.crc, self.filled = 0, 0
        return {"mtime_ns": os.stat(self.file.name).st_mtime_ns, "crc32": self.checksums}


def merge_parts(
    folder: Path, parts: list[Part], directory: Path, tokenizer: Tokenizer, key: dict[str, Any]
) -> dict[str, dict[str, int]]:
    """Writes the finished ``parts`` in order into the split files and manifest of ``directory`` (the manifest last);
    returns the splits' counts. Each document goes to the split of its index in the whole corpus."""
    dtype = token_dtype(tokenizer.vocab_size)
    stats = {split: dict.fromkeys(SPLIT_STATS, 0) for split in SPLITS}
    files = {split: ChecksummedWriter(directory / f"{split}.bin", CHUNK_BYTES) for split in SPLITS}
    split_of = functools.partial(document_split, val_fraction=key["val_fraction"], test_fraction=key["test_fraction"])
    first = 0  # the corpus index of the part's first document
    progress = Progress("merging the parts into the cache", len(parts), unit=" parts")
    try:
        for part in parts:
            sizes, tokens = read_sizes(folder, part.index), read_tokens(folder, part.index, dtype)
            starts = np.concatenate([[0], np.cumsum(sizes[:, 0])])
            for split, run in itertools.groupby(range(first, first + len(sizes)), split_of):
                indices = list(run)
                low, high = indices[0] - first, indices[-1] - first + 1  # the run's rows in this part
                files[split].write(tokens[starts[low] : starts[high]].tobytes())
                stats[split]["documents"] += high - low
                stats[split]["tokens"] += int(starts[high] - starts[low])
                stats[split]["bytes"] += int(sizes[low:high, 1].sum())
            first += len(sizes)
            progress.advance(1, len(sizes))
    finally:
        progress.close()
        checksums = {split: file.close() for split, file in files.items()}
    counts = {split: stats[split]["documents"] for split in SPLITS}
    if min(counts[split] for split in SPLITS if split != "test" or key["test_fraction"] > 0) == 0:
        raise ValueError(
            f"the corpus has {sum(counts.values())} document(s), split {counts} with val_fraction="
            f"{key['val_fraction']}, test_fraction={key['test_fraction']}: each split needs at least one; add documents (several files instead of one), "
            "or cut plain-text files into documents with data.document_separator (e.g. '' for blank lines)"
        )
    vocabulary = {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "dtype": dtype.name}
    manifest = {**key, **vocabulary, "splits": stats, "checksums": {"chunk_bytes": CHUNK_BYTES, **checksums}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return stats
