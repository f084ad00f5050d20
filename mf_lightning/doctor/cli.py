"""mf doctor: check that this package computes correctly on this machine, and measure how fast.

    mf doctor                       # on the GPU when one is visible, else the CPU; the report on stdout
    mf doctor --out report.md       # also write it to a file (paste it into an issue)
    mf doctor --device cpu --quick  # fewer shapes and steps (a minute)

Stages: the environment; every Memory Layer backend on the device against the reference (forward and
every gradient, float32 and bfloat16, odd shapes, uniform and skewed buckets); the Memory Layer against
``nn.Linear`` at the tiny/small/base widths with its bandwidth; a short training of MemoryFormer and the
Transformer; the compiled decoding step. Exit status 0 on PASS, 1 on FAIL.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mf_lightning.config_errors import OneLineArgumentParser

DEVICES = ("cuda", "cpu")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options, checked without importing torch (``mf doctor --help`` stays cheap)."""
    parser = OneLineArgumentParser(
        prog="mf doctor", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report to this file")
    parser.add_argument("--device", choices=DEVICES, default=None, help="default: cuda when visible, else cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and steps, eager decoding")
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: folder {args.out.parent} does not exist")
    if args.out is not None and args.out.is_dir():
        parser.error(f"--out {args.out} is a folder; give a file name, e.g. {args.out / 'doctor.md'}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run every stage, print the report (and write ``--out``), end with the verdict; exit 1 on FAIL."""
    args = parse_args(argv)
    import torch

    from mf_lightning.doctor import report

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device cuda: no CUDA device is visible to torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'none'}); use --device cpu"
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    found = report.run(device, args.quick, report.stderr_progress)
    shown = sys.argv[1:] if argv is None else list(argv)
    text = report.render(found, shown, time.perf_counter() - started)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
        report.stderr_progress(f"mf doctor: wrote {args.out}")
    print(found.verdict())
    if not found.passed:
        raise SystemExit(1)
