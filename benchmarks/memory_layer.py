"""Memory Layer speed per backend against ``nn.Linear`` of the same shape, on whatever device is present.

For every width ``w`` (a ``w -> w`` layer) and token count it times the forward (under
``torch.inference_mode``, as in decoding) and forward+backward (input, tables and bias all need
gradients) with ``torch.utils.benchmark`` (warm-up, CUDA synchronisation, median of blocked runs), and
reports the forward's achieved memory bandwidth: bytes of table rows gathered + input + output for a
Memory Layer, weight + input + output for ``nn.Linear``, divided by the time. Backends: ``torch`` (the
reference; skipped where its ``[tokens, K, w]`` gather would exceed ``--max-reference-gib``),
``embedding_bag``, ``triton`` (CUDA only) and, with ``--compile``, ``torch.compile`` of embedding_bag.

The markdown table is printed and written to ``benchmarks/results/memory_layer_<device>.md``.

    python benchmarks/memory_layer.py --quick
    python benchmarks/memory_layer.py --tokens 1 16 256 4096 --widths 512 1024 2048 --note "shared CPU"
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import benchmark

from mf_lightning.kernels.dispatch import triton_importable
from mf_lightning.nn import MemoryLayer

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DECODE_WIDTH = 1024


@dataclass
class Row:
    """One measured implementation at one shape; times in seconds, ``None`` where not measured."""

    width: int
    tokens: int
    impl: str
    forward_s: float | None
    forward_bytes: int
    train_step_s: float | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096, 16384])
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--quick", action="store_true", help="only widths 1024, tokens 1 64 1024")
    parser.add_argument("--code-bits", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--backends", nargs="+", choices=["torch", "embedding_bag", "triton"], default=None,
                        help="default: every backend usable on the device")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the embedding_bag path")
    parser.add_argument("--forward-only", action="store_true", help="skip forward+backward")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--max-reference-gib", type=float, default=1.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--note", default="", help="free text for the header (e.g. machine load)")
    parser.add_argument("--output", type=pathlib.Path, default=None, help="default: results/memory_layer_<device>.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.widths = [1, 64, 1024], [DECODE_WIDTH]
    for width in args.widths:
        if width % args.code_bits:
            parser.error(f"--widths {width} is not divisible by --code-bits {args.code_bits}")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """``cpu`` or the GPU's name in lowercase words joined by ``_`` (e.g. ``nvidia_h100_80gb_hbm3``)."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    """Median time of ``fn()`` after warm-up; ``torch.utils.benchmark`` synchronises CUDA around runs."""
    fn()
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def time_module(module: nn.Module, x: torch.Tensor, min_run_time: float, forward_only: bool) -> tuple[float, float | None]:
    """Forward time (inference mode) and forward+backward time (fresh gradients each step)."""

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    leaf = x.detach().requires_grad_()
    grad_y = torch.randn_like(forward())

    def train_step() -> None:
        module.zero_grad(set_to_none=True)
        leaf.grad = None
        module(leaf).backward(grad_y)

    forward_s = median_seconds(forward, min_run_time)
    return forward_s, None if forward_only else median_seconds(train_step, min_run_time)


def available_backends(device: torch.device, requested: list[str] | None) -> list[str]:
    usable = ["torch", "embedding_bag"] + (["triton"] if device.type == "cuda" and triton_importable() else [])
    if requested is None:
        return usable
    missing = [name for name in requested if name not in usable]
    if missing:
        raise SystemExit(f"backend(s) {missing} cannot run on {device}; usable here: {usable}")
    return requested


def measure_width(args: argparse.Namespace, device: torch.device, width: int, backends: list[str]) -> list[Row]:
    """Rows for ``nn.Linear`` and every Memory Layer implementation at each token count, printed as measured."""
    dtype = DTYPES[args.dtype]
    element = torch.finfo(dtype).bits // 8
    num_tables = width // args.code_bits
    factory = {"device": device, "dtype": dtype}
    layers: dict[str, nn.Module] = {
        name: MemoryLayer(width, width, args.code_bits, backend=name, **factory) for name in backends
    }
    if args.compile:
        eager = MemoryLayer(width, width, args.code_bits, backend="embedding_bag", **factory)
        layers["embedding_bag+compile"] = torch.compile(eager)
    linear = nn.Linear(width, width, **factory)
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, width, **factory)
        io_bytes = 2 * tokens * width * element
        baseline = Row(width, tokens, "nn.Linear", None, width * width * element + io_bytes)
        baseline.forward_s, baseline.train_step_s = time_module(linear, x, args.min_run_time, args.forward_only)
        rows.append(baseline)
        print(format_row(baseline, baseline), flush=True)
        gathered = tokens * num_tables * width * element
        for name, layer in layers.items():
            row = Row(width, tokens, name, None, gathered + io_bytes)
            if name != "torch" or gathered / 2**30 <= args.max_reference_gib:
                row.forward_s, row.train_step_s = time_module(layer, x, args.min_run_time, args.forward_only)
            rows.append(row)
            print(format_row(row, baseline), flush=True)
    return rows


def milliseconds(seconds: float | None) -> str:
    return "skipped" if seconds is None else f"{seconds * 1e3:.3f}"


def ratio(seconds: float | None, baseline: float | None) -> str:
    return "" if seconds is None or baseline is None else f"{seconds / baseline:.2f}x"


TABLE_HEADER = (
    "| width | tokens | implementation | fwd ms | fwd GB/s | fwd / Linear | fwd+bwd ms | fwd+bwd / Linear |\n"
    "|---:|---:|---|---:|---:|---:|---:|---:|"
)


def format_row(row: Row, baseline: Row) -> str:
    bandwidth = "" if row.forward_s is None else f"{row.forward_bytes / row.forward_s / 1e9:.1f}"
    return (
        f"| {row.width} | {row.tokens} | {row.impl} | {milliseconds(row.forward_s)} | {bandwidth} | "
        f"{ratio(row.forward_s, baseline.forward_s)} | {milliseconds(row.train_step_s)} | "
        f"{ratio(row.train_step_s, baseline.train_step_s)} |"
    )


def target_checks(rows: list[Row]) -> list[str]:
    """The project's speed targets, judged on the fastest Memory Layer at each shape measured."""
    lines = []
    for (width, tokens), group in group_by_shape(rows).items():
        linear = group[0]
        fastest = min((r for r in group[1:] if r.forward_s is not None), key=lambda r: r.forward_s, default=None)
        if fastest is None:
            continue
        speedup = fastest.forward_s / linear.forward_s
        if tokens == 1 and width == DECODE_WIDTH:
            verdict = "met" if speedup < 1 else "MISSED"
            lines.append(f"- decoding (1 token, {width} -> {width}), forward faster than nn.Linear: {verdict} "
                         f"({fastest.impl} {speedup:.2f}x Linear's time)")  # fmt: skip
        if tokens == max(r.tokens for r in rows if r.width == width) and tokens > 1:
            verdict = "met" if speedup <= 2 else "MISSED"
            lines.append(f"- {tokens} tokens, width {width}, forward within 2x of nn.Linear: {verdict} "
                         f"({fastest.impl} {speedup:.2f}x)")  # fmt: skip
    return lines


def group_by_shape(rows: list[Row]) -> dict[tuple[int, int], list[Row]]:
    groups: dict[tuple[int, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.width, row.tokens), []).append(row)
    return groups


def report(args: argparse.Namespace, device: torch.device, rows: list[Row], command: str) -> str:
    groups = group_by_shape(rows)
    table = [format_row(row, group[0]) for group in groups.values() for row in group]
    header = [
        f"# Memory Layer benchmark: {device_name(device)}",
        "",
        f"- torch {torch.__version__}, {args.dtype}, code_bits {args.code_bits}, layers width -> width",
        f"- date {datetime.date.today().isoformat()}",
        f"- command: `{command}`",
        "- fwd: forward under inference_mode; fwd+bwd: input, tables and bias all take gradients",
        "- fwd GB/s: (rows gathered + input + output) bytes / time; for nn.Linear (weight + input + output)",
    ]
    if args.note:
        header.append(f"- note: {args.note}")
    return "\n".join([*header, "", TABLE_HEADER, *table, "", "## Targets", "", *target_checks(rows), ""])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    backends = available_backends(device, args.backends)
    torch.manual_seed(0)
    print(TABLE_HEADER)
    rows = [row for width in args.widths for row in measure_width(args, device, width, backends)]
    command = shlex.join(["python", "benchmarks/memory_layer.py", *(sys.argv[1:] if argv is None else argv)])
    text = report(args, device, rows, command)
    output = args.output or RESULTS_DIR / f"memory_layer_{device_slug(device)}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"\n{text.split('## Targets')[1].strip()}\n\nwritten to {output}")


if __name__ == "__main__":
    main()
