"""Memory Layer speed per backend against ``nn.Linear`` of the same shape, on whatever device is present.

For every width ``w`` (a ``w -> w`` layer) and token count it times the forward (under
``torch.inference_mode``, as in decoding) and forward+backward (input, tables and bias all need
gradients) with ``torch.utils.benchmark`` (warm-up, CUDA synchronisation, median of blocked runs), and
reports the forward's achieved memory bandwidth: bytes of table rows gathered + input + output for a
Memory Layer, weight + input + output for ``nn.Linear``, divided by the time. On CUDA it also gives that
bandwidth as a fraction of the device's practical peak (a device-to-device copy measured first, bytes
read + written) and of its datasheet peak (``SPEC_PEAKS``, matched on the device name). Backends:
``torch`` (the reference; skipped where its ``[tokens, K, w]`` gather would exceed
``--max-reference-gib``, and not run by default on CUDA), ``embedding_bag``, ``triton`` (CUDA only) and,
with ``--compile``, ``torch.compile`` of embedding_bag.

Skewed bucket usage (``--skews``): at ``--skew-tokens`` tokens (default: the most measured) it also times
every Memory Layer implementation, both triton backward modes included, on inputs whose chunks hash
``uniform`` ly (random signs), with the per-table row usage measured in training (``gini``: Gini 0.93,
as the ablation study saw Q/K/V collapse), and with every token on one row of each table (``hot``); the
Gini of the hashed input is measured and printed beside each case.

The markdown tables are printed and written to ``benchmarks/results/memory_layer_<device>.md``.

    python benchmarks/memory_layer.py --quick
    python benchmarks/memory_layer.py --tokens 1 16 256 4096 --widths 512 1024 2048 --note "shared CPU"
    python benchmarks/memory_layer.py --device cuda     # widths 1024 2048, float32 and bfloat16
    python benchmarks/memory_layer.py --skews uniform hot --skew-tokens 4096 --widths 1024
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys
from dataclasses import dataclass

import torch
from harness import RESULTS, device_name, device_slug, environment
from torch import nn

from mf_lightning.callbacks.usage_metrics import counts_with_gini, gini
from mf_lightning.doctor.inputs import HOT_ROW, inputs_hashing_to
from mf_lightning.doctor.speed import linear_bytes, memory_layer_bytes
from mf_lightning.doctor.timing import copy_bandwidth, time_module
from mf_lightning.kernels import bucket_indices
from mf_lightning.kernels.dispatch import triton_usable
from mf_lightning.nn import MemoryLayer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DECODE_WIDTH = 1024
GOAL_TOKENS, GOAL_WIDTH, GOAL_FRACTION = 16384, 1024, 0.70
"""GPU goal: the triton forward at 16384 tokens x 1024 moves at least 70% of the device's peak bandwidth."""
SPEC_PEAKS = [
    ("h200", 4.8e12),
    ("h100 pcie", 2.0e12),
    ("h100", 3.35e12),
    ("a100-sxm4-80gb", 2.039e12),
    ("a100 80gb pcie", 1.935e12),
    ("a100", 1.555e12),
]
"""Datasheet HBM bandwidth (bytes/s) by lowercase device-name fragment, most specific first (H200: 4.8 TB/s
by its datasheet, ~4.3 TB/s seen as a device copy; H100 SXM 3.35 TB/s)."""


SKEWS = ("uniform", "gini", "hot")
MEASURED_GINI = 0.93
"""Gini coefficient of Q/K/V bucket usage measured in training (the ablation study)."""


@dataclass
class Row:
    """One measured implementation at one shape; times in seconds, ``None`` where not measured."""

    dtype: str
    width: int
    tokens: int
    impl: str
    forward_s: float | None
    forward_bytes: int
    train_step_s: float | None = None
    inputs: str = "uniform"
    gini: float | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096, 16384])
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="default: 512 1024 2048; CUDA 1024 2048")
    parser.add_argument("--quick", action="store_true", help="only widths 1024, tokens 1 64 1024")
    parser.add_argument("--code-bits", type=int, default=8)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="default: float32 on CPU, float32 and bfloat16 on CUDA")  # fmt: skip
    parser.add_argument("--backends", nargs="+", choices=["torch", "embedding_bag", "triton"], default=None,
                        help="default: every backend usable on the device (CUDA: embedding_bag, triton)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the embedding_bag path")
    parser.add_argument("--forward-only", action="store_true", help="skip forward+backward")
    parser.add_argument("--skews", nargs="*", choices=SKEWS, default=list(SKEWS),
                        help="bucket usages of the skew table (none: no skew table)")  # fmt: skip
    parser.add_argument("--skew-tokens", type=int, default=None, help="tokens of the skew table (default: most)")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--max-reference-gib", type=float, default=1.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--note", default="", help="free text for the header (e.g. machine load)")
    parser.add_argument("--output", type=pathlib.Path, default=None, help="default: results/memory_layer_<device>.md")
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.widths = args.widths or ([1024, 2048] if on_cuda else [512, 1024, 2048])
    args.dtypes = args.dtypes or (["float32", "bfloat16"] if on_cuda else ["float32"])
    if args.quick:
        args.tokens, args.widths = [1, 64, 1024], [DECODE_WIDTH]
    args.skew_tokens = args.skew_tokens or max(args.tokens)
    for width in args.widths:
        if width % args.code_bits:
            parser.error(f"--widths {width} is not divisible by --code-bits {args.code_bits}")
    return args


def available_backends(device: torch.device, requested: list[str] | None) -> list[str]:
    """The requested backends (default: every one usable on ``device``; triton on CPU only interpreted,
    ``TRITON_INTERPRET=1``, which checks the path but says nothing of its speed)."""
    on_cuda = device.type == "cuda"
    usable = ["torch", "embedding_bag"] + (["triton"] if triton_usable(device) else [])
    if requested is None:
        return usable[1:] if on_cuda else usable
    missing = [name for name in requested if name not in usable]
    if missing:
        raise SystemExit(f"backend(s) {missing} cannot run on {device}; usable here: {usable}")
    return requested


def spec_bandwidth(device: torch.device) -> float | None:
    """The datasheet bandwidth of ``device`` from ``SPEC_PEAKS``, ``None`` when unknown or on CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for fragment, peak in SPEC_PEAKS if fragment in name), None)


def memory_layers(args: argparse.Namespace, width: int, backends: list[str], factory: dict) -> dict[str, nn.Module]:
    """Every Memory Layer implementation measured, by its name in the tables."""
    layers: dict[str, nn.Module] = {
        name: MemoryLayer(width, width, args.code_bits, backend=name, **factory) for name in backends
    }
    if "triton" in layers:
        layers["triton atomic bwd"] = MemoryLayer(
            width, width, args.code_bits, backend="triton", triton_backward="atomic", **factory
        )
    if args.compile:
        eager = MemoryLayer(width, width, args.code_bits, backend="embedding_bag", **factory)
        layers["embedding_bag+compile"] = torch.compile(eager)
    return layers


def time_layer(layer: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> tuple[float, float | None]:
    return time_module(layer, x, args.min_run_time, args.forward_only)


def measure_width(
    args: argparse.Namespace, device: torch.device, dtype_name: str, width: int, backends: list[str], peaks: tuple
) -> list[Row]:
    """Rows for ``nn.Linear`` and every Memory Layer implementation at each token count, printed as measured."""
    dtype = DTYPES[dtype_name]
    element = torch.finfo(dtype).bits // 8
    num_tables = width // args.code_bits
    factory = {"device": device, "dtype": dtype}
    layers = memory_layers(args, width, backends, factory)
    linear = nn.Linear(width, width, **factory)
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, width, **factory)
        baseline = Row(dtype_name, width, tokens, "nn.Linear", None, linear_bytes(tokens, width, width, element))
        baseline.forward_s, baseline.train_step_s = time_layer(linear, x, args)
        rows.append(baseline)
        print(format_row(baseline, baseline, peaks), flush=True)
        gathered = tokens * num_tables * width * element
        for name, layer in layers.items():
            row = Row(
                dtype_name, width, tokens, name, None, memory_layer_bytes(tokens, num_tables, width, width, element)
            )
            if name != "torch" or gathered / 2**30 <= args.max_reference_gib:
                row.forward_s, row.train_step_s = time_layer(layer, x, args)
            rows.append(row)
            print(format_row(row, baseline, peaks), flush=True)
    return rows


def skewed_input(skew: str, tokens: int, width: int, code_bits: int, factory: dict) -> torch.Tensor:
    """``[tokens, width]`` input whose chunks hash with the ``skew`` usage of each table's rows (see the
    module docstring): signs set bit by bit (``z >= 0`` is bit 1, most significant first), random magnitudes."""
    if skew == "uniform":
        return torch.randn(tokens, width, **factory)
    num_tables, num_rows = width // code_bits, 2**code_bits
    if skew == "hot":
        buckets = torch.full((tokens, num_tables), HOT_ROW)
    else:
        counts = [counts_with_gini(tokens, num_rows, MEASURED_GINI) for _ in range(num_tables)]
        columns = [torch.randperm(num_rows).repeat_interleave(c)[torch.randperm(tokens)] for c in counts]
        buckets = torch.stack(columns, dim=1)
    return inputs_hashing_to(buckets, code_bits).to(**factory)


def measured_gini(x: torch.Tensor, code_bits: int) -> float:
    """Mean over tables of the Gini coefficient of row usage, from hashing ``x`` as the layer does."""
    buckets = bucket_indices(x.float().reshape(x.shape[0], -1, code_bits)).cpu()
    counts = torch.stack([torch.bincount(column, minlength=2**code_bits) for column in buckets.T])
    return float(gini(counts).mean())


def measure_skews(
    args: argparse.Namespace, device: torch.device, dtype_name: str, width: int, backends: list[str]
) -> list[Row]:
    """Rows of every Memory Layer implementation on each skewed input at ``--skew-tokens``, printed as measured."""
    factory = {"device": device, "dtype": DTYPES[dtype_name]}
    layers = memory_layers(args, width, backends, factory)
    rows = []
    for skew in args.skews:
        x = skewed_input(skew, args.skew_tokens, width, args.code_bits, factory)
        usage = measured_gini(x, args.code_bits)
        gathered = args.skew_tokens * (width // args.code_bits) * width * x.element_size()
        for name, layer in layers.items():
            row = Row(dtype_name, width, args.skew_tokens, name, None, gathered, inputs=skew, gini=usage)
            if name != "torch" or gathered / 2**30 <= args.max_reference_gib:
                row.forward_s, row.train_step_s = time_layer(layer, x, args)
            rows.append(row)
            print(format_skew_row(row, rows), flush=True)
    return rows


def milliseconds(seconds: float | None) -> str:
    return "skipped" if seconds is None else f"{seconds * 1e3:.3f}"


def ratio(seconds: float | None, baseline: float | None) -> str:
    return "" if seconds is None or baseline is None else f"{seconds / baseline:.2f}x"


TABLE_HEADER = (
    "| dtype | width | tokens | implementation | fwd ms | fwd GB/s | % copy peak | % spec peak | fwd / Linear "
    "| fwd+bwd ms | fwd+bwd / Linear |\n"
    "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
)


def bytes_per_second(row: Row) -> float | None:
    return None if row.forward_s is None else row.forward_bytes / row.forward_s


def percent(value: float | None, peak: float | None) -> str:
    return "" if value is None or peak is None else f"{100 * value / peak:.0f}%"


def format_row(row: Row, baseline: Row, peaks: tuple[float | None, float | None]) -> str:
    """One table line; ``peaks`` is (measured copy, datasheet) bandwidth, ``None`` where unknown."""
    bandwidth = bytes_per_second(row)
    return (
        f"| {row.dtype} | {row.width} | {row.tokens} | {row.impl} | {milliseconds(row.forward_s)} | "
        f"{'' if bandwidth is None else f'{bandwidth / 1e9:.1f}'} | {percent(bandwidth, peaks[0])} | "
        f"{percent(bandwidth, peaks[1])} | {ratio(row.forward_s, baseline.forward_s)} | "
        f"{milliseconds(row.train_step_s)} | {ratio(row.train_step_s, baseline.train_step_s)} |"
    )


SKEW_HEADER = (
    "| dtype | width | tokens | inputs | Gini | implementation | fwd ms | fwd+bwd ms | fwd+bwd / uniform |\n"
    "|---|---:|---:|---|---:|---|---:|---:|---:|"
)


def format_skew_row(row: Row, rows: list[Row]) -> str:
    """One line of the skew table; the last column against the same implementation on uniform input."""
    uniform = next(
        (r for r in rows if (r.dtype, r.width, r.impl, r.inputs) == (row.dtype, row.width, row.impl, "uniform")), None
    )
    return (
        f"| {row.dtype} | {row.width} | {row.tokens} | {row.inputs} | {row.gini:.2f} | {row.impl} | "
        f"{milliseconds(row.forward_s)} | {milliseconds(row.train_step_s)} | "
        f"{ratio(row.train_step_s, uniform.train_step_s if uniform else None)} |"
    )


def target_checks(rows: list[Row], peaks: tuple[float | None, float | None]) -> list[str]:
    """The project's speed targets, judged on the fastest Memory Layer at each shape measured, and on a GPU
    the triton goals: forward bandwidth at 16384 x 1024, forward+backward against embedding_bag."""
    lines = []
    for (dtype, width, tokens), group in group_by_shape(rows).items():
        linear = group[0]
        fastest = min((r for r in group[1:] if r.forward_s is not None), key=lambda r: r.forward_s, default=None)
        if fastest is None:
            continue
        speedup = fastest.forward_s / linear.forward_s
        shape = f"{dtype}, {tokens} tokens, width {width}"
        if tokens == 1 and width == DECODE_WIDTH:
            verdict = "met" if speedup < 1 else "MISSED"
            lines.append(f"- {shape} (decoding), forward faster than nn.Linear: {verdict} "
                         f"({fastest.impl} {speedup:.2f}x Linear's time)")  # fmt: skip
        if tokens == max(r.tokens for r in rows if r.width == width) and tokens > 1:
            verdict = "met" if speedup <= 2 else "MISSED"
            lines.append(f"- {shape}, forward within 2x of nn.Linear: {verdict} ({fastest.impl} {speedup:.2f}x)")
        by_impl = {row.impl: row for row in group}
        triton_row, bag_row = by_impl.get("triton"), by_impl.get("embedding_bag")
        peak = peaks[0] or peaks[1]
        if triton_row and peak and (tokens, width) == (GOAL_TOKENS, GOAL_WIDTH):
            fraction = bytes_per_second(triton_row) / peak
            verdict = "met" if fraction >= GOAL_FRACTION else "MISSED"
            lines.append(f"- {shape}, triton forward >= {GOAL_FRACTION:.0%} of peak bandwidth: {verdict} "
                         f"({fraction:.0%} of the {'measured copy' if peaks[0] else 'datasheet'} peak)")  # fmt: skip
        if triton_row and bag_row and triton_row.train_step_s and bag_row.train_step_s and tokens >= 1024:
            verdict = "met" if triton_row.train_step_s < bag_row.train_step_s else "MISSED"
            lines.append(f"- {shape}, triton forward+backward faster than embedding_bag: {verdict} "
                         f"({triton_row.train_step_s / bag_row.train_step_s:.2f}x its time)")  # fmt: skip
        atomic_row = by_impl.get("triton atomic bwd")
        if triton_row and atomic_row and triton_row.train_step_s and atomic_row.train_step_s and tokens >= 1024:
            lines.append(f"- {shape}, deterministic / atomic triton forward+backward time: "
                         f"{triton_row.train_step_s / atomic_row.train_step_s:.2f}x "
                         "(above 1 favours model.triton_backward: atomic)")  # fmt: skip
    return lines


def group_by_shape(rows: list[Row]) -> dict[tuple[str, int, int], list[Row]]:
    groups: dict[tuple[str, int, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.dtype, row.width, row.tokens), []).append(row)
    return groups


def report(
    args: argparse.Namespace,
    device: torch.device,
    rows: list[Row],
    skew_rows: list[Row],
    command: str,
    peaks: tuple[float | None, float | None],
) -> str:
    groups = group_by_shape(rows)
    table = [format_row(row, group[0], peaks) for group in groups.values() for row in group]
    header = [
        f"# Memory Layer benchmark: {device_name(device)}",
        "",
        f"- {environment(device)}",
        f"- {' and '.join(args.dtypes)}, code_bits {args.code_bits}, layers width -> width",
        f"- command: `{command}`",
        "- fwd: forward under inference_mode; fwd+bwd: input, tables and bias all take gradients",
        "- fwd GB/s: (rows gathered + input + output) bytes / time; for nn.Linear (weight + input + output)",
    ]
    if device.type == "cuda":
        copy, spec = (f"{peak / 1e9:.0f} GB/s" if peak else "unknown" for peak in peaks)
        header.append(f"- peaks: device-to-device copy measured {copy} (read + write); datasheet {spec}")
        header.append("- triton: deterministic table gradient (default); triton atomic bwd: triton_backward='atomic'")
    if args.note:
        header.append(f"- note: {args.note}")
    skews = []
    if skew_rows:
        skews = ["", "## Skewed bucket usage", "",
                 "Gini: measured on the hashed input, mean over tables; fwd+bwd / uniform: against the same "
                 "implementation on uniform input.", "", SKEW_HEADER,
                 *(format_skew_row(row, skew_rows) for row in skew_rows)]  # fmt: skip
    return "\n".join([*header, "", TABLE_HEADER, *table, *skews, "", "## Targets", "", *target_checks(rows, peaks), ""])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    backends = available_backends(device, args.backends)
    torch.manual_seed(0)
    peaks = (copy_bandwidth(device, args.min_run_time) if device.type == "cuda" else None, spec_bandwidth(device))
    print(TABLE_HEADER)
    rows = [
        row
        for dtype in args.dtypes
        for width in args.widths
        for row in measure_width(args, device, dtype, width, backends, peaks)
    ]
    skew_rows = []
    if args.skews:
        print(f"\n{SKEW_HEADER}")
        skew_rows = [
            row
            for dtype in args.dtypes
            for width in args.widths
            for row in measure_skews(args, device, dtype, width, backends)
        ]
    command = shlex.join(["python", "benchmarks/memory_layer.py", *(sys.argv[1:] if argv is None else argv)])
    text = report(args, device, rows, skew_rows, command, peaks)
    output = args.output or RESULTS / f"memory_layer_{device_slug(device)}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"\n{text.split('## Targets')[1].strip()}\n\nwritten to {output}")


if __name__ == "__main__":
    main()
