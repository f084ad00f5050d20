"""Which hash checkpoints carry for their tensors: candidate hashes against the time to read the file.

Saves ``--mib`` MiB of float32 tensors (``--tensor-mib`` each) as one ``torch.save`` checkpoint, then
times reading it back (``torch.load``, every tensor copied out of the file: what a load does anyway) and
hashing the same tensors' bytes, in one thread, with each candidate: SHA-256 and BLAKE2b (hashlib,
cryptographic), xxHash's XXH3-64 and XXH3-128 (``xxhash``), CRC-32 and Adler-32 (``zlib``). Each time is
the median of ``--repeats`` runs with the file in the page cache (a cold disk only makes reading slower,
so the ratios are upper bounds). Prints a markdown table and writes it to
``benchmarks/results/checkpoint_digest_cpu.md``.

    python benchmarks/checkpoint_digest.py [--mib 256] [--tensor-mib 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import xxhash
from harness import cpu_description, markdown_table, median_wall_seconds, write_result

CANDIDATES: dict[str, Callable[[memoryview], object]] = {
    "sha256 (hashlib)": lambda data: hashlib.sha256(data).digest(),
    "blake2b (hashlib)": lambda data: hashlib.blake2b(data).digest(),
    "xxh3_64 (xxhash)": lambda data: xxhash.xxh3_64_digest(data),
    "xxh3_128 (xxhash)": lambda data: xxhash.xxh3_128_digest(data),
    "crc32 (zlib)": lambda data: zlib.crc32(data),
    "adler32 (zlib)": lambda data: zlib.adler32(data),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--tensor-mib", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    count = max(1, args.mib // args.tensor_mib)
    generator = torch.Generator().manual_seed(0)
    state = {f"t{index}": torch.randn(args.tensor_mib << 18, generator=generator) for index in range(count)}
    views = [memoryview(tensor.view(torch.uint8).numpy()) for tensor in state.values()]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "last.ckpt"
        torch.save({"state_dict": state}, path)
        read = median_wall_seconds(
            lambda: [tensor.clone() for tensor in torch.load(path, weights_only=True)["state_dict"].values()],
            args.repeats,
        )
    rows = [
        ("read the checkpoint (torch.load, every tensor copied)", f"{read:.3f}", f"{args.mib / 1024 / read:.2f}", "")
    ]
    for name, digest in CANDIDATES.items():
        seconds = median_wall_seconds(lambda digest=digest: [digest(view) for view in views], args.repeats)
        rows.append((name, f"{seconds:.3f}", f"{args.mib / 1024 / seconds:.2f}", f"{100 * seconds / read:.0f} %"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"# Checkpoint tensor digest: candidate hashes ({cpu_description()}, one hashing thread, torch {torch.__version__})",
        "",
        f"`python benchmarks/checkpoint_digest.py --mib {args.mib} --tensor-mib {args.tensor_mib} --repeats "
        f"{args.repeats}`; {count} float32 tensors of {args.tensor_mib} MiB; median of the repeats, file in the "
        f"page cache; the machine was shared with other processes (load average {load:.1f} at the end).",
        "",
        *markdown_table(("what", "seconds", "GiB/s", "of reading"), rows),
    ]
    write_result("checkpoint_digest_cpu.md", "\n".join(lines))


if __name__ == "__main__":
    main()
