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
  JSONL and text compressed with gzip or Zstandard (``.jsonl.gz``, ``.json.gz``, ``.jsonl.zst``,
  ``.txt.gz``, ``.txt.zst``: any name ending ``.gz`` / ``.zst``) are read through ``compressed``.
- a folder written by ``datasets.save_to_disk`` (detected by its ``state.json`` or
  ``dataset_dict.json``), or ``"hf:<name>"`` for ``datasets.load_dataset(name, split=hf_split)``
  (network needed once; the ``datasets`` package is imported only here).

Bad data is an error, never skipped: a plain-text or compressed file that is empty, a text file that is
not UTF-8, a JSONL line that is not UTF-8, not an object or lacks ``text_field``, a compressed file that is
damaged or truncated, a Parquet file that cannot be read or lacks that column, each raises naming the
file (and line and document). Empty records inside JSONL, Parquet and datasets are
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

For parallel preparation a source cuts itself into parts (``Part``, from ``parts(part_bytes)``): runs of
consecutive documents, each read on its own by ``part_documents`` (in a worker process), whose
concatenation in order is exactly ``documents()``. Small files are grouped into one part; an
uncompressed JSONL file larger than ``part_bytes`` is cut into byte ranges, each owning the lines that
start inside it; a compressed, Parquet or plain-text file is one part (a compressed stream cannot be
entered in the middle). A dataset is cut into row ranges. ``sample_documents`` reads a bounded,
reproducible sample spread over all parts (the BPE's training text).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sysconfig
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from mf_lightning.data.compressed import CompressedFile, inner_suffix, is_compressed

log = logging.getLogger(__name__)

IDENTITY_BLOCK = 1 << 16
IDENTITY_SAMPLES = 3
DEMO_MAX_BYTES = 4_000_000
DEMO_SKIPPED_FOLDERS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__"}
)
GLOB_CHARACTERS = frozenset("*?[")
VALID_SPECS = (
    '"demo", a text/JSONL/Parquet file, a folder or glob of them, a folder written by datasets.save_to_disk, '
    'or "hf:<dataset name>"'
)


@dataclass(frozen=True)
class Piece:
    """A whole file (``start == 0``, ``end`` its size), the lines of an uncompressed JSONL file that start in bytes
    ``[start, end)``, or the rows ``[start, end)`` of a dataset (``name`` is then the dataset's)."""

    name: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Part:
    """Consecutive documents of a source, read and tokenized as one unit; ``size`` is in bytes of its files
    (compressed where they are; estimated for a dataset), the unit of progress and of the BPE sample's shares.
    ``piece_unit`` says what its pieces' ``start`` and ``end`` count."""

    index: int
    pieces: tuple[Piece, ...]
    size: int
    piece_unit: str = "bytes"

    def describe(self) -> str:
        """Where the part's documents come from, for messages."""
        first, last = self.pieces[0], self.pieces[-1]
        if len(self.pieces) > 1:
            return f"part {self.index} ({len(self.pieces)} files, {first.name} .. {last.name})"
        return f"part {self.index} ({first.name} {self.piece_unit} {first.start}..{first.end})"


class Cursor:
    """How far the reading of a part has got, in bytes like its ``size``; readers move it as they go."""

    def __init__(self) -> None:
        self.done = 0
        self.in_piece = 0

    @property
    def position(self) -> int:
        return self.done + self.in_piece

    def finish_piece(self, piece: Piece) -> None:
        self.done += piece.size
        self.in_piece = 0


class Source(ABC):
    """A corpus: an ordered, repeatable stream of documents and a string identifying its content."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """Changes whenever the documents could change."""

    @abstractmethod
    def documents(self) -> Iterator[str]:
        """The documents, always in the same order."""

    def change(self) -> str | None:
        """What changed in the documents since ``identity`` was taken (checked after preparing), or ``None``."""
        return None

    @abstractmethod
    def parts(self, part_bytes: int) -> list[Part]:
        """The source cut into parts of about ``part_bytes`` (see the module docstring); the same cut every time."""

    @abstractmethod
    def part_documents(self, part: Part, cursor: Cursor | None = None) -> Iterator[str]:
        """The documents of ``part`` in order, moving ``cursor`` as they are read."""


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
        return json.dumps(
            {
                "files": self.file_identities,
                "text_field": self.text_field,
                "document_separator": self.document_separator,
            }
        )

    @cached_property
    def file_identities(self) -> list[list[Any]]:
        return [file_identity(file) for file in self.files]

    def change(self) -> str | None:
        changes = (file_change(file, recorded) for file, recorded in zip(self.files, self.file_identities))
        return next((change for change in changes if change is not None), None)

    def documents(self) -> Iterator[str]:
        for file in self.files:
            yield from self.file_documents(file, Cursor())

    def file_documents(self, file: Path, cursor: Cursor, start: int = 0, end: int | None = None) -> Iterator[str]:
        """The documents of ``file`` (of its lines starting in ``[start, end)`` for JSONL), by its extension."""
        suffix = inner_suffix(file)
        if suffix in (".jsonl", ".json"):
            yield from read_jsonl(file, self.text_field, cursor, start, end)
        elif suffix == ".parquet" and not is_compressed(file):
            yield from read_parquet(file, self.text_field)
        elif self.document_separator is None:
            yield read_text(file)
        else:
            yield from split_records(read_text(file), self.document_separator)

    def parts(self, part_bytes: int) -> list[Part]:
        parts: list[Part] = []
        grouped: list[Piece] = []

        def close_group() -> None:
            if grouped:
                parts.append(Part(len(parts), tuple(grouped), sum(piece.size for piece in grouped)))
                grouped.clear()

        for file in self.files:
            size = file.stat().st_size
            if is_splittable(file) and size > part_bytes:
                close_group()
                for start in range(0, size, part_bytes):
                    piece = Piece(str(file), start, min(start + part_bytes, size))
                    parts.append(Part(len(parts), (piece,), piece.size))
            else:
                if grouped and sum(piece.size for piece in grouped) + size > part_bytes:
                    close_group()
                grouped.append(Piece(str(file), 0, size))
        close_group()
        return parts

    def part_documents(self, part: Part, cursor: Cursor | None = None) -> Iterator[str]:
        cursor = cursor or Cursor()
        for piece in part.pieces:
            whole = piece.start == 0 and piece.end == Path(piece.name).stat().st_size
            yield from self.file_documents(Path(piece.name), cursor, piece.start, None if whole else piece.end)
            cursor.finish_piece(piece)


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

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None}

    def documents(self) -> Iterator[str]:
        yield from self.rows(0, len(self.dataset), Cursor())

    @property
    def row_bytes(self) -> int:
        """The dataset's average size of a row in bytes: the unit of its parts' sizes and progress."""
        return max(1, self.dataset.data.nbytes // max(1, len(self.dataset)))

    def rows(self, start: int, end: int, cursor: Cursor) -> Iterator[str]:
        """The documents of rows ``[start, end)``; the cursor counts their estimated bytes."""
        texts = self.dataset.select_columns([self.text_field]).select(range(start, end)).iter(batch_size=1000)
        row_bytes = self.row_bytes
        for row, text in enumerate((text for batch in texts for text in batch[self.text_field]), start=start):
            cursor.in_piece = (row + 1 - start) * row_bytes
            yield from checked_record(text, f"dataset {self.name_or_path} row {row}", self.text_field)

    def parts(self, part_bytes: int) -> list[Part]:
        rows, row_bytes = len(self.dataset), self.row_bytes
        step = max(1, part_bytes // row_bytes)
        name = f"dataset {self.name_or_path}"
        return [
            Part(
                index,
                (Piece(name, start, min(start + step, rows)),),
                (min(start + step, rows) - start) * row_bytes,
                "rows",
            )
            for index, start in enumerate(range(0, rows, step))
        ]

    def part_documents(self, part: Part, cursor: Cursor | None = None) -> Iterator[str]:
        (piece,) = part.pieces
        yield from self.rows(piece.start, piece.end, cursor or Cursor())


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


def file_change(file: Path, recorded: list[Any]) -> str | None:
    """``"<file> was removed"`` or ``"<file> was modified"`` unless ``file`` still has the identity ``recorded``."""
    if not file.exists():
        return f"{file} was removed"
    if file_identity(file) != recorded:
        return f"{file} was modified"
    return None


def recorded_change(identity: str) -> str | None:
    """What changed in the files of a source whose ``identity`` (what its ``identity`` was) is all that is known of it:
    the first removed or modified file of a file source; ``None`` when every file is as recorded, or for a
    source whose change cannot be told from its identity (a dataset's fingerprint)."""
    try:
        recorded = json.loads(identity)["files"]
        files = [(Path(entry[0]), entry) for entry in recorded]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    changes = (file_change(file, entry) for file, entry in files)
    return next((change for change in changes if change is not None), None)


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
    """The whole UTF-8 text of ``file`` (decompressed if it is); empty or undecodable files are errors naming the file."""
    if is_compressed(file):
        with CompressedFile(file) as compressed:
            try:
                data = compressed.stream.read()
            except compressed.errors as error:
                raise ValueError(
                    f"compressed file {file} is damaged or truncated ({error}); replace or remove it"
                ) from error
    else:
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


def read_jsonl(
    file: Path, text_field: str, cursor: Cursor | None = None, start: int = 0, end: int | None = None
) -> Iterator[str]:
    """The ``text_field`` of each JSON object line of ``file``, or of the lines starting in bytes ``[start, end)``.

    A compressed file is read whole; damage in it, or a compressed file with no data, is an error naming the
    file, the line and the document reached.
    """
    cursor = cursor or Cursor()
    if is_compressed(file):
        with CompressedFile(file) as compressed:
            lines = jsonl_records(compressed.stream, file, text_field, cursor, 0, None)
            documents = -1
            try:
                for documents, text in enumerate(lines):  # noqa: B007
                    cursor.in_piece = compressed.compressed_position
                    yield text
            except compressed.errors as error:
                raise ValueError(
                    f"compressed file {file} is damaged or truncated after document {documents + 1} of the file "
                    f"({error}); replace or remove it"
                ) from error
            if documents < 0:
                raise ValueError(f"compressed file {file} holds no documents (it is empty); remove it from the corpus")
        return
    with file.open("rb") as lines:
        yield from jsonl_records(lines, file, text_field, cursor, start, end)


def jsonl_records(
    lines: Any, file: Path, text_field: str, cursor: Cursor, start: int, end: int | None
) -> Iterator[str]:
    """The texts of the JSON lines of the binary stream ``lines`` that start in ``[start, end)`` of it."""
    position = start
    if start > 0:
        lines.seek(start - 1)
        position = start - 1 + len(lines.readline())  # the line under way at ``start`` belongs to the part before
    count = 0
    for raw in lines:
        if end is not None and position >= end:
            return
        line_start, position = position, position + len(raw)
        count += 1
        cursor.in_piece = position - start
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            reason = f"byte {error.start}: {error.reason}"
            where = line_label(file, start, count, line_start)
            raise ValueError(f"{where} is not UTF-8 ({reason}); convert or remove it") from error
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{line_label(file, start, count, line_start)} is not valid JSON: {error}") from error
        if not isinstance(record, dict) or text_field not in record:
            keys = list(record) if isinstance(record, dict) else type(record).__name__
            where = line_label(file, start, count, line_start)
            raise ValueError(f"{where} has no text field {text_field!r} (found {keys})")
        text = record[text_field]
        if isinstance(text, str) and text:
            yield text
        elif text is not None and text != "":
            yield from checked_record(text, line_label(file, start, count, line_start), text_field)


def line_label(file: Path, start: int, count: int, line_start: int) -> str:
    """``"<file> line <n>"`` for the ``count``-th line read from byte ``start``, found at byte ``line_start``."""
    return f"{file} line {count if start == 0 else line_number(file, line_start)}"


def line_number(file: Path, offset: int) -> int:
    """The number of the line of the uncompressed ``file`` that starts at byte ``offset`` (read only for errors)."""
    newlines = 0
    with file.open("rb") as data:
        while offset > 0:
            block = data.read(min(offset, 1 << 20))
            if not block:
                break
            newlines += block.count(b"\n")
            offset -= len(block)
    return newlines + 1


def is_splittable(file: Path) -> bool:
    """Whether ``file`` can be cut into byte ranges: uncompressed JSONL."""
    return not is_compressed(file) and file.suffix.lower() in (".jsonl", ".json")


def sample_documents(source: Source, sample_bytes: int, part_bytes: int) -> Iterator[str]:
    """All documents when the source's files hold at most ``sample_bytes``; else the first documents of every
    part, each part giving a share of ``sample_bytes`` of text in proportion to its size (about ``sample_bytes``
    in all, the same every time, spread over the whole corpus)."""
    parts = source.parts(part_bytes)
    total = sum(part.size for part in parts)
    if total <= sample_bytes:
        yield from source.documents()
        return
    for part in parts:
        share, taken = sample_bytes * part.size / total, 0
        for document in source.part_documents(part):
            if taken >= share:
                break
            taken += len(document.encode("utf-8"))
            yield document


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
