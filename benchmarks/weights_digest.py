"""Cost of the SHA-256 of a model folder's tensors: computed at save, checked at every load.

Writes ``--gib`` GiB of float32 tensors (64 MiB each, as large Memory Layer tables are) into a
safetensors file, then times: computing the digest of the tensors in memory (added to every save),
saving the file, reading all tensors back (what loading does anyway) and checking the file's digest
(added to every load). Each time is the median of ``--repeats`` runs with the file in the page cache
(a cold disk adds its read time to the first of load and check, not to both). Prints a markdown table
and writes it to ``benchmarks/results/weights_digest_cpu.md``.

    python benchmarks/weights_digest.py [--gib 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from harness import cpu_description, median_wall_seconds, write_result
from safetensors.torch import load_file, save_file

from mf_lightning.models.integrity import DIGEST_KEY, check_file_digests, hashing_threads, tensors_digests

TENSOR_BYTES = 64 << 20
BASE_BF16_GB = 13.0
"""MemoryFormer-base's weights in bfloat16 (6.6 billion table values), the largest folder ``mf export`` writes."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    count = max(1, round(args.gib * (1 << 30) / TENSOR_BYTES))
    generator = torch.Generator().manual_seed(0)
    state = {f"tables.{index}": torch.randn(TENSOR_BYTES // 4, generator=generator) for index in range(count)}
    gib = count * TENSOR_BYTES / (1 << 30)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        digest_seconds = median_wall_seconds(lambda: tensors_digests(state), args.repeats)
        metadata = {"format": "pt", DIGEST_KEY: tensors_digests(state)}
        save_seconds = median_wall_seconds(lambda: save_file(state, path, metadata=metadata), args.repeats)
        load_seconds = median_wall_seconds(
            lambda: [tensor.clone() for tensor in load_file(path).values()], args.repeats
        )
        check_seconds = median_wall_seconds(lambda: check_file_digests(path), args.repeats)
    rows = [
        ("digests of the tensors in memory (at save)", digest_seconds),
        ("save_file", save_seconds),
        ("load_file: read every tensor (what loading does anyway)", load_seconds),
        ("check the file's digests (at load)", check_seconds),
    ]
    lines = [
        f"# Weights digest (SHA-256) cost ({cpu_description()}, {hashing_threads()} hashing threads, torch {torch.__version__})",
        "",
        (
            f"`python benchmarks/weights_digest.py --gib {args.gib} --repeats {args.repeats}`; {count} float32 tensors"
            f" of {TENSOR_BYTES >> 20} MiB ({gib:.2f} GiB); median of the repeats, file in the page cache; the machine"
            f" was shared with other processes (load average {os.getloadavg()[0]:.1f} at the end)."
        ),
        "",
        "| what | seconds | GiB/s |",
        "|---|---:|---:|",
        *(f"| {what} | {seconds:.3f} | {gib / seconds:.2f} |" for what, seconds in rows),
        "",
        (
            f"Check at load: {100 * check_seconds / load_seconds:.0f}% of reading the tensors; at this rate the"
            f" {BASE_BF16_GB:g} GB of MemoryFormer-base in bfloat16 take about"
            f" {BASE_BF16_GB * 1e9 / (1 << 30) / (gib / check_seconds):.0f} s to check"
            f" and {BASE_BF16_GB * 1e9 / (1 << 30) / (gib / digest_seconds):.0f} s to digest at save."
        ),
    ]
    table = "\n".join(lines)
    print(table)
    write_result("weights_digest_cpu.md", table)


if __name__ == "__main__":
    main()
