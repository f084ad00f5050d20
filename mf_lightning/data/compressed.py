"""Reading ``.gz`` and ``.zst`` corpus files as plain byte streams, with damage reported rather than ignored.

How the Pile, SlimPajama, RedPajama and Dolma ship: JSONL (or text) compressed with gzip or Zstandard.
gzip comes with Python and raises on a truncated or damaged stream. Zstandard is read with the
``zstandard`` package (python-zstandard: bindings to the reference C library, maintained since 2016, wheels
for every platform, the decompressor the Pile's own tooling uses); its ready-made stream reader returns a
truncated file's data as if it were whole, so :class:`ZstdReader` decompresses frame by frame and raises
when the input ends inside a frame. Both readers expose how many compressed bytes they consumed
(``compressed_position``) for progress reporting.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path
from typing import BinaryIO

COMPRESSIONS = (".gz", ".zst")
READ_BYTES = 1 << 20


class CorruptCompressedFile(ValueError):
    """A compressed file whose stream is damaged or cut short."""


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a Zstandard file of one or more frames; raises if the last frame is cut short."""

    def __init__(self, raw: BinaryIO) -> None:
        import zstandard

        self.raw = raw
        self.context = zstandard.ZstdDecompressor()
        self.frame = self.context.decompressobj()
        self.frame_started = False
        self.pending = memoryview(b"")
        self.errors: tuple[type[BaseException], ...] = (zstandard.ZstdError,)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self.pending:
            compressed = self.raw.read(READ_BYTES)
            if not compressed:
                if self.frame_started:
                    raise CorruptCompressedFile("the Zstandard stream ends inside a frame (truncated file)")
                return 0
            self.pending = memoryview(self.decompress(compressed))
        size = min(len(buffer), len(self.pending))
        buffer[:size] = self.pending[:size]
        self.pending = self.pending[size:]
        return size

    def decompress(self, compressed: bytes) -> bytes:
        """Decompresses ``compressed``, starting a new frame whenever one ends inside it."""
        output = []
        while compressed:
            if self.frame.eof:
                self.frame = self.context.decompressobj()
            self.frame_started = True
            output.append(self.frame.decompress(compressed))
            compressed = self.frame.unused_data if self.frame.eof else b""
            self.frame_started = not self.frame.eof
        return b"".join(output)


class CompressedFile:
    """A compressed corpus file opened for reading lines or all of it; a context manager."""

    def __init__(self, file: Path) -> None:
        self.raw = file.open("rb")
        if file.name.lower().endswith(".zst"):
            reader = ZstdReader(self.raw)
            self.errors = (*reader.errors, CorruptCompressedFile)
            self.stream: BinaryIO = io.BufferedReader(reader, READ_BYTES)
        else:
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")  # type: ignore[assignment]
            self.errors = (gzip.BadGzipFile, EOFError, zlib.error, CorruptCompressedFile)

    @property
    def compressed_position(self) -> int:
        """Compressed bytes read so far."""
        return self.raw.tell()

    def __enter__(self) -> CompressedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()
        self.raw.close()


def is_compressed(file: Path) -> bool:
    """Whether ``file`` is read through a decompressor (by its last suffix)."""
    return file.suffix.lower() in COMPRESSIONS


def inner_suffix(file: Path) -> str:
    """The suffix that says the format: ``.jsonl`` for ``a.jsonl.zst`` and for ``a.jsonl``."""
    name = file.name.lower()
    for compression in COMPRESSIONS:
        name = name.removesuffix(compression)
    return Path(name).suffix
