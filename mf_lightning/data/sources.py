"""Where documents come from: files, Hugging Face datasets, or the embedded demo corpus.

``open_source(spec)`` accepts:

- ``"demo"``: the running Python's standard library source (``.py`` files, tests and encoding tables
  left out), the first ``DEMO_MAX_BYTES`` walking folders in sorted order. It exists on every machine and needs
  no download: a demo corpus of real, structured text, not a benchmark.
- a file, a folder (every non-hidden file under it, sorted) or a glob. Each file is read by its
  extension: ``.jsonl`` or ``.json`` (one JSON object per line, text in ``text_field``), ``.parquet`` (text in
  column ``text_field``), anything else is plain UTF-8 text: one document per file, or, with a
  ``document_separator``, one per record between lines equal to it (``"%"`` for fortune files, ``""``
  for blank lines), so that a single large file can still be split into training and validation.
- a folder written by ``datasets.save_to_disk`` (detected by its ``state.json`` or
  ``dataset_dict.json``), or ``"hf:<name>"`` for ``datasets.load_dataset(name, split=hf_split)``
  (network needed once; the ``datasets`` package is imported only here).

Bad data is an error, never skipped: a plain-text file that is empty or not UTF-8, a JSONL line that
is not UTF-8, not an object or lacks ``text_field``, a Parquet file that cannot be read or lacks that
column, each raises naming the file (and line). Empty records inside JSONL, Parquet and datasets are
skipped: they carry no text. A Hub dataset that cannot be reached is a ``ConnectionError`` naming it.

Each source has an ``identity`` string that changes whenever its text could, used to key token caches
and trained tokenizers. For a file it holds the path, size, modification time, the inode change time
(``st_ctime_ns``: every write and every reset of the modification time updates it, and no user call
can set it back, so an edit that keeps size and mtime still changes it) and a CRC-32 of
``IDENTITY_SAMPLES`` blocks of ``IDENTITY_BLOCK`` bytes spread over the file (the whole of a small
file), for file systems whose ctime cannot be trusted. It costs a ``stat`` and at most three small
reads per file, whatever the corpus's size; the price is that copying the corpus or changing its
permissions changes the identity, and the corpus is tokenized again. For datasets it is the dataset
fingerprint.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sysconfig
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IDENTITY_BLOCK = 1 << 16
IDENTITY_SAMPLES = 3
PROGRESS_SECONDS = 10.0
DEMO_MAX_BYTES = 4_000_000
DEMO_SKIPPED_FOLDERS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__"}
)
GLOB_CHARACTERS = frozenset("*?[")
VALID_SPECS = (
    '"demo", a text/JSONL/Parquet file, a folder or glob of them, a folder written by datasets.save_to_disk, '
    'or "hf:<dataset name>"'
)


class Source(ABC):
    """A corpus: an ordered, repeatable stream of documents and a string identifying its content."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """Changes whenever the documents could change."""

    @abstractmethod
    def documents(self) -> Iterator[str]:
        """The documents, always in the same order."""


class FileSource(Source):
    """Documents from files, each read according to its extension (see the module docstring)."""

    def __init__(self, files: list[Path], text_field: str = "text", document_separator: str | None = None) -> None:
        if not files:
            raise ValueError("a file source needs at least one file")
        self.files = files
        self.text_field = text_field
        self.document_separator = document_separator

    @cached_property
    def identity(self) -> str:
        files = [file_identity(file) for file in self.files]
        return json.dumps(
            {"files": files, "text_field": self.text_field, "document_separator": self.document_separator}
        )

    def documents(self) -> Iterator[str]:
        for file in self.files:
            suffix = file.suffix.lower()
            if suffix in (".jsonl", ".json"):
                yield from read_jsonl(file, self.text_field)
            elif suffix == ".parquet":
                yield from read_parquet(file, self.text_field)
            elif self.document_separator is None:
                yield read_text(file)
            else:
                yield from split_records(read_text(file), self.document_separator)


class DatasetSource(Source):
    """Documents from the ``text_field`` column of a Hugging Face dataset, loaded on first use."""

    def __init__(
        self, name_or_path: str, text_field: str = "text", split: str = "train", from_disk: bool = True
    ) -> None:
        self.name_or_path = name_or_path
        self.text_field = text_field
        self.split = split
        self.from_disk = from_disk
        self._dataset: Any = None

    @property
    def dataset(self) -> Any:
        """The ``datasets.Dataset`` of the chosen split, with ``text_field`` checked."""
        if self._dataset is None:
            dataset = load_hf_dataset(self.name_or_path, self.split, self.from_disk)
            if self.text_field not in dataset.column_names:
                raise ValueError(
                    f"dataset {self.name_or_path} has no text field {self.text_field!r}; "
                    f"its columns are {dataset.column_names}"
                )
            self._dataset = dataset
        return self._dataset

    @property
    def identity(self) -> str:
        dataset = {"dataset": self.name_or_path, "split": self.split, "fingerprint": self.dataset._fingerprint}
        return json.dumps({**dataset, "text_field": self.text_field})

    def documents(self) -> Iterator[str]:
        texts = self.dataset.select_columns([self.text_field]).iter(batch_size=1000)
        for row, text in enumerate(text for batch in texts for text in batch[self.text_field]):
            yield from checked_record(text, f"dataset {self.name_or_path} row {row}", self.text_field)


class DemoSource(FileSource):
    """The embedded demo corpus: the standard library's Python source of the running interpreter."""

    def __init__(self, max_bytes: int = DEMO_MAX_BYTES) -> None:
        super().__init__(demo_files(Path(sysconfig.get_paths()["stdlib"]), max_bytes))


def file_identity(file: Path) -> list[Any]:
    """Path, size, mtime, ctime and sampled-content CRC-32 of ``file`` (see the module docstring)."""
    stat = file.stat()
    crc = 0
    with file.open("rb") as data:
        for index in range(IDENTITY_SAMPLES):
            data.seek(max(0, stat.st_size - IDENTITY_BLOCK) * index // max(1, IDENTITY_SAMPLES - 1))
            crc = zlib.crc32(data.read(IDENTITY_BLOCK), crc)
    return [str(file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, crc]


def with_progress(documents: Iterable[str], action: str) -> Iterator[str]:
    """``documents`` unchanged, logging how many (and how much text) went by every ``PROGRESS_SECONDS``."""
    started = last = time.monotonic()
    count = size = 0
    for document in documents:
        yield document
        count += 1
        size += len(document)
        now = time.monotonic()
        if now - last >= PROGRESS_SECONDS:
            last = now
            log.info("%s: %d documents, %.1f M characters so far (%.0f s)", action, count, size / 1e6, now - started)


def demo_files(root: Path, max_bytes: int) -> list[Path]:
    """Sorted ``.py`` files under ``root`` (skipping tests, vendored packages, codec tables) up to ``max_bytes``."""
    chosen, total = [], 0
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in DEMO_SKIPPED_FOLDERS)
        for name in sorted(names):
            file = Path(folder) / name
            size = file.stat().st_size
            if name.endswith(".py") and size > 0:
                if total + size > max_bytes:
                    return chosen
                chosen.append(file)
                total += size
    return chosen


def read_text(file: Path) -> str:
    """The whole UTF-8 text of ``file``; empty or undecodable files are errors naming the file."""
    data = file.read_bytes()
    if not data.strip():
        raise ValueError(f"text file {file} is empty; remove it from the corpus")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        reason = f"byte {error.start}: {error.reason}"
        raise ValueError(f"text file {file} is not UTF-8 ({reason}); convert or remove it") from error


def split_records(text: str, separator: str) -> Iterator[str]:
    """The non-blank records of ``text`` between lines equal to ``separator`` (surrounding spaces ignored)."""
    record: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.strip() == separator.strip():
            if "".join(record).strip():
                yield "".join(record)
            record = []
        else:
            record.append(line)
    if "".join(record).strip():
        yield "".join(record)


def read_jsonl(file: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` of each JSON object line of ``file``."""
    with file.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                reason = f"byte {error.start}: {error.reason}"
                raise ValueError(f"{file} line {number} is not UTF-8 ({reason}); convert or remove it") from error
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file} line {number} is not valid JSON: {error}") from error
            if not isinstance(record, dict) or text_field not in record:
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{file} line {number} has no text field {text_field!r} (found {keys})")
            yield from checked_record(record[text_field], f"{file} line {number}", text_field)


def read_parquet(file: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` column of the Parquet ``file``, read in batches."""
    import pyarrow
    import pyarrow.parquet as pq

    row = 0
    try:
        parquet = pq.ParquetFile(file)
        columns = parquet.schema_arrow.names
        if text_field not in columns:
            raise ValueError(f"Parquet file {file} has no text field {text_field!r}; its columns are {columns}")
        for batch in parquet.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                yield from checked_record(text, f"{file} row {row}", text_field)
                row += 1
    except (pyarrow.ArrowException, OSError) as error:  # pyarrow reports damaged files as either
        raise ValueError(f"Parquet file {file} cannot be read ({error}); it is truncated or not Parquet") from error


def checked_record(text: object, where: str, text_field: str) -> Iterator[str]:
    """Yields ``text`` if it is a non-empty string, nothing if empty; anything else is an error naming ``where``."""
    if text is None or text == "":
        return
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} holds {type(text).__name__}, expected a string")
    yield text


def load_hf_dataset(name_or_path: str, split: str, from_disk: bool) -> Any:
    """A ``datasets.Dataset``: one ``split`` of a ``save_to_disk`` folder, or of a named dataset from the Hub."""
    import datasets

    if not from_disk:
        try:
            return datasets.load_dataset(name_or_path, split=split)
        except ConnectionError as error:
            raise ConnectionError(
                f"dataset hf:{name_or_path} cannot be downloaded ({error}); connect to the network, "
                "or use a copy saved with save_to_disk"
            ) from error
    dataset = datasets.load_from_disk(name_or_path)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"dataset {name_or_path} has no split {split!r}; its splits are {list(dataset)}")
        return dataset[split]
    return dataset


def expand_files(spec: str) -> list[Path]:
    """The files named by a path or glob: a folder gives every non-hidden file under it, sorted."""
    if GLOB_CHARACTERS & set(spec):
        paths = [Path(match) for match in sorted(glob.glob(spec, recursive=True))]
        if not paths:
            raise FileNotFoundError(f"source glob {spec!r} matches no files")
    else:
        paths = [Path(spec)]
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(
                file for file in path.rglob("*") if file.is_file() and not is_hidden(file.relative_to(path))
            )
        elif path.is_file():
            files.append(path)
    if not files:
        raise FileNotFoundError(f"source {spec!r} holds no files")
    return files


def is_hidden(relative: Path) -> bool:
    """Whether any part of ``relative`` starts with a dot (``.git``, ``.DS_Store``)."""
    return any(part.startswith(".") for part in relative.parts)


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets`` ``save_to_disk``."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def open_source(
    spec: str, text_field: str = "text", hf_split: str = "train", document_separator: str | None = None
) -> Source:
    """The source named by ``spec`` (see the module docstring for the forms); nothing is read yet."""
    if not spec:
        raise ValueError(f"empty source; expected {VALID_SPECS}")
    if spec == "demo":
        return DemoSource()
    if spec.startswith("hf:"):
        return DatasetSource(spec.removeprefix("hf:"), text_field, hf_split, from_disk=False)
    if is_saved_dataset(Path(spec)):
        return DatasetSource(spec, text_field, hf_split, from_disk=True)
    if not GLOB_CHARACTERS & set(spec) and not Path(spec).exists():
        raise FileNotFoundError(f"source {spec!r} does not exist; expected {VALID_SPECS}")
    return FileSource(expand_files(spec), text_field, document_separator)
