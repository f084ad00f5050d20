"""Cost of verifying token caches by content, and of keying file sources, on a cache of realistic size.

Writes one ``--gib`` GiB token file (a block of 1M random ``uint16`` ids written over and over, in
writes of the size the cache builder makes for a batch of documents) plainly and through
``ChecksummedWriter``, then times the checks made when a cache is opened: the one before checksums
(a scan for the largest id, reading every byte), the sampled check of every open (first, last and
``SAMPLED_CHUNKS`` random chunks of ``CHUNK_BYTES``) and the full check (a file modified since
written, or ``data.verify_cache: true``). Also times a source's ``identity`` over the big file and over
``--files`` small ones. Each time is the median of
``--repeats`` runs with the file in the page cache (a cold disk reads slower; the sampled check reads
the same few chunks whatever the size). Prints a markdown table and writes it to
``benchmarks/results/cache_verification_cpu.md``.

    python benchmarks/cache_verification.py [--gib 1] [--files 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from harness import cpu_description, median_wall_seconds, write_result

from mf_lightning.data.cache import CHUNK_BYTES, SAMPLED_CHUNKS, ChecksummedWriter, TokenCache, content_problem
from mf_lightning.data.sources import FileSource

TOKENS_PER_WRITE = 1 << 20


def write_tokens(path: Path, gib: float, checksummed: bool) -> dict:
    """Writes ``gib`` GiB of random uint16 ids to ``path``; returns the checksums when ``checksummed``."""
    tokens = np.random.default_rng(0).integers(0, 50_000, TOKENS_PER_WRITE, dtype=np.uint16).tobytes()
    writes = int(gib * (1 << 30) / len(tokens))
    file = ChecksummedWriter(path, CHUNK_BYTES) if checksummed else path.open("wb")
    for _ in range(writes):
        file.write(tokens)
    recorded = file.close()
    return recorded or {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        plain_write = median_wall_seconds(lambda: write_tokens(root / "plain.bin", args.gib, False), args.repeats)
        (root / "plain.bin").unlink()
        checksums: dict = {}
        checksum_write = median_wall_seconds(
            lambda: checksums.update(write_tokens(root / "train.bin", args.gib, True)), args.repeats
        )
        size = (root / "train.bin").stat().st_size
        manifest = {
            "dtype": "uint16",
            "splits": {"train": {"tokens": size // 2}},
            "checksums": {"chunk_bytes": CHUNK_BYTES, "train": checksums},
        }
        token_cache = TokenCache(root, manifest)
        old_check = median_wall_seconds(lambda: int(token_cache.open("train").max()), args.repeats)
        sampled = median_wall_seconds(lambda: content_problem(token_cache, "train", full=False), args.repeats)
        full = median_wall_seconds(lambda: content_problem(token_cache, "train", full=True), args.repeats)
        assert content_problem(token_cache, "train", full=True) is None
        small = root / "small"
        small.mkdir()
        for index in range(args.files):
            (small / f"{index:05d}.txt").write_bytes(os.urandom(4096))
        big_identity = median_wall_seconds(lambda: FileSource([root / "train.bin"]).identity, args.repeats)
        small_identity = median_wall_seconds(lambda: FileSource(sorted(small.iterdir())).identity, args.repeats)
    gib = size / (1 << 30)
    cache_size = f"{gib:.2f} GiB"
    rows = [
        ("write tokens, plain", cache_size, plain_write, True),
        ("write tokens with per-chunk CRC-32 (build)", cache_size, checksum_write, True),
        ("open check before this change: scan for the largest id", cache_size, old_check, True),
        (f"open check now: sizes + {SAMPLED_CHUNKS + 2} sampled chunks", cache_size, sampled, False),
        ("full check (file modified, or data.verify_cache: true)", cache_size, full, True),
        ("source identity of one big file", cache_size, big_identity, False),
        (f"source identity of {args.files} files of 4 KiB", f"{args.files * 4 / 1024:.1f} MiB", small_identity, False),
    ]
    table = [
        f"# Token cache verification ({cpu_description()}, {CHUNK_BYTES >> 20} MiB chunks)",
        "",
        f"`python benchmarks/cache_verification.py --gib {args.gib} --files {args.files} --repeats {args.repeats}`;"
        " median of the repeats, file in the page cache; the machine was shared with other processes"
        f" (load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        "| what | data | seconds | GiB/s |",
        "|---|---|---:|---:|",
        *(
            f"| {what} | {data} | {seconds:.4f} | {f'{gib / seconds:.2f}' if reads_all else ''} |"
            for what, data, seconds, reads_all in rows
        ),
        "",
        f"Checksum overhead at build: {100 * (checksum_write / plain_write - 1):+.0f}% of writing the tokens.",
        f"The sampled open check reads at most {(SAMPLED_CHUNKS + 2) * CHUNK_BYTES >> 20} MiB per split whatever the"
        f" cache size; a full check of a Pile-size cache (~600 GiB of uint16 tokens) at the rate above takes"
        f" ~{600 / (gib / full) / 60:.0f} min.",
    ]
    text = "\n".join(table) + "\n"
    write_result("cache_verification_cpu.md", text)


if __name__ == "__main__":
    main()
