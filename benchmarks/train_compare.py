"""MemoryFormer against the baseline Transformer of the same width and depth, trained on the same real text.

    python benchmarks/train_compare.py [--corpus FILE [--document-separator %] | demo] [--steps 300]
        [--preset debug] [--overrides "{n_layer: 4, n_embd: 128, max_seq_len: 256}"]
        [--runs transformer:1e-3 memoryformer:3e-3 ...] [--out benchmarks/results]

Every run is a real ``mf fit --config configs/quickstart.yaml`` (in-process, through
``mf_lightning.cli.main``) on a fortune file split into documents at ``%`` lines, or on the embedded
``demo`` corpus (byte-level by default), with the
same preset, overrides, seed, steps, batch and sequence length; only the architecture and the learning
rate (and optionally the tables' learning-rate multiplier) differ, as each of ``--runs ARCH:LR[:TABLE_LR_X] ...``
says. Checkpoints and the Memory Layer monitors are switched off so they cost no time. The figures come
from each run's TensorBoard events (``loss/train``, ``loss/val``, ``val/ppl``, ``val/bpb`` and the
ThroughputMonitor's ``train/time`` and ``train/lengths``); FLOPs/token from
``model.network.flops_per_token(seq_len)``. Writes ``train_compare_<device>.md`` (settings, command and a
side-by-side table, each MemoryFormer run's validation loss against the first Transformer run's) and
``train_compare_<device>_loss.png`` (training and validation loss against tokens) into ``--out``.

Bytes rather than a BPE by default: with 257 ids the embedding and LM head stay small, so the comparison
is between the blocks (with a BPE of a few thousand ids the head would hold most of a small baseline's
parameters and FLOPs), and nothing is trained before the runs. One torch thread by default: on a CPU
shared with other jobs, extra threads mostly wait for each other, and with one thread MemoryFormer runs
repeat bit for bit.

Each run goes through ``harness.train`` (shared with ``benchmarks/ablations.py``), which caches its
``RunResult`` beside the run's logs.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from harness import (
    DEFAULT_CORPUS,
    REPO,
    RunResult,
    RunSpec,
    check_fit_args,
    corpus_path,
    device_slug,
    display_path,
    environment,
    fit_parser,
    tokens_per_step,
    train,
    write_result,
)
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mf_lightning.config import ARCHS

DEFAULT_RUNS = ("transformer:1e-3", "memoryformer:3e-3")
GOAL = 0.05
"""MemoryFormer's validation loss may exceed the baseline's by at most this fraction at equal tokens."""
SMOOTHING = 0.6
"""Exponential moving-average weight of the plotted training-loss curves."""


def parse_run(text: str) -> RunSpec:
    """``ARCH:LR[:TABLE_LR_MULTIPLIER]``, e.g. ``memoryformer:3e-3`` or ``memoryformer:3e-3:2``."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ARCHS:
        raise ValueError(f"--runs {text!r} must be ARCH:LR[:TABLE_LR_MULTIPLIER] with ARCH one of {', '.join(ARCHS)}")
    try:
        numbers = [float(part) for part in parts[1:]]
    except ValueError:
        raise ValueError(f"--runs {text!r}: learning rate and multiplier must be numbers") from None
    if not all(math.isfinite(number) and number > 0 for number in numbers):
        raise ValueError(f"--runs {text!r}: the learning rate and multiplier must be positive")
    return RunSpec(parts[0], *numbers)


def first_transformer(results: list[RunResult]) -> RunResult | None:
    """The baseline the MemoryFormer runs are measured against."""
    return next((result for result in results if result.spec.arch == "transformer"), None)


def excess_loss(result: RunResult, baseline: RunResult) -> float:
    """Relative excess of ``result``'s final validation loss over ``baseline``'s (0.05 = 5% higher)."""
    return result.last("loss/val") / baseline.last("loss/val") - 1


def table(results: list[RunResult], args: argparse.Namespace) -> list[str]:
    """Markdown rows side by side; each run's final validation loss relative to the first Transformer's."""
    baseline = first_transformer(results)
    versus_header = "val loss vs baseline" if baseline is None else f"val loss vs {baseline.spec.label}"
    rows = [
        "| arch | lr | table lr x | parameters | FLOPs/token (train) | tokens | val loss | val ppl | val bpb "
        f"| best val loss | {versus_header} | train tokens/s | fit wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        spec = result.spec
        versus = "—" if baseline is None else f"{100 * excess_loss(result, baseline):+.1f}%"
        best = min(value for _, value in result.scalars["loss/val"])
        rows.append(
            f"| {spec.arch} | {spec.lr:g} | {spec.table_lr_multiplier:g} "
            f"| {result.parameters / 1e6:.2f} M | {result.flops_per_token / 1e6:.2f} M "
            f"| {args.steps * tokens_per_step(args):,} "
            f"| {result.last('loss/val'):.4f} | {result.last('val/ppl'):.3f} | {result.last('val/bpb'):.4f} "
            f"| {best:.4f} | {versus} | {result.tokens_per_second():,.0f} | {result.fit_seconds:.0f} |"
        )
    return rows


def verdicts(results: list[RunResult]) -> list[str]:
    """Per MemoryFormer run and Transformer run: is the former's final validation loss within ``GOAL``?"""
    baselines = [result for result in results if result.spec.arch == "transformer"]
    if not baselines:
        return ["No Transformer run, so no baseline to compare against."]
    lines = []
    for result in results:
        for baseline in baselines if result.spec.arch == "memoryformer" else []:
            excess = excess_loss(result, baseline)
            met = "met" if excess <= GOAL else f"missed by {100 * (excess - GOAL):.1f} points"
            lines.append(
                f"- {result.spec.label} against {baseline.spec.label}: validation loss {100 * excess:+.1f}% "
                f"(goal: at most +{100 * GOAL:.0f}%): {met}."
            )
    return lines


def smoothed(values: list[float]) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
    average, out = 0.0, []
    for count, value in enumerate(values, start=1):
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        out.append(average / (1 - SMOOTHING**count))
    return out


def plot(results: list[RunResult], args: argparse.Namespace, path: Path) -> None:
    """Training loss (smoothed, raw faint) and validation loss against training tokens, one colour per run."""
    figure = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(figure)
    train_axes, val_axes = figure.subplots(1, 2)
    for index, result in enumerate(results):
        colour = f"C{index}"
        for axes, tag in ((train_axes, "loss/train"), (val_axes, "loss/val")):
            steps, values = zip(*result.scalars[tag])
            tokens = [(step + 1) * tokens_per_step(args) for step in steps]
            if tag == "loss/train":
                axes.plot(tokens, values, color=colour, alpha=0.25, linewidth=0.8)
                axes.plot(tokens, smoothed(list(values)), color=colour, label=result.spec.label)
            else:
                axes.plot(tokens, values, color=colour, marker="o", label=result.spec.label)
    for axes, title in ((train_axes, f"training loss (EMA {SMOOTHING}, raw faint)"), (val_axes, "validation loss")):
        axes.set_title(title)
        axes.set_xlabel("training tokens")
        axes.set_ylabel("cross-entropy (nats/byte)" if args.tokenizer == "byte" else "cross-entropy (nats/token)")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"{display_path(args.corpus)}: preset {args.preset}, overrides {args.overrides}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def report(results: list[RunResult], args: argparse.Namespace, device: str, command: str, png: str) -> str:
    """The markdown result file: device, command and settings, the table, the verdicts and the curves."""
    return "\n".join(
        [
            "# MemoryFormer vs the baseline Transformer on real text, equal tokens",
            "",
            f"- {environment(device)}",
            f"- command: `{command}`",
            f"- settings shared by every run: `configs/quickstart.yaml` with corpus `{display_path(args.corpus)}` "
            f"{f'split at {args.document_separator!r} lines' if args.corpus != 'demo' else ''}, tokenizer `{args.tokenizer}`, preset `{args.preset}`, overrides `{args.overrides}`, "
            f"seed {args.seed}, "
            f"{args.steps} steps x {args.batch_size} windows x {args.seq_len} tokens = "
            f"{args.steps * tokens_per_step(args):,} training tokens; {results[0].recipe}; validation every "
            f"{args.val_every} steps on the same {args.val_batches * args.batch_size} held-out windows; checkpoints "
            f"and Memory Layer monitors {'off' if not args.bucket_every else 'on'}",
            "- per run: the architecture, the peak learning rate and the tables' learning-rate multiplier, as the "
            "table shows",
            "- FLOPs/token: `flops_per_token(seq_len)`, forward + backward (3x forward), embedding lookups, norms and "
            f"hashing not counted (SPEC §3). Train tokens/s: median over {args.log_every}-step windows of the "
            "ThroughputMonitor's `train/lengths` over `train/time`, the first window (warm-up) and validation "
            "excluded. Fit wall: the whole `mf fit`, setup and validation included. The machine is shared with "
            "other engineers' jobs, so every speed figure is noisy.",
            "",
            *table(results, args),
            "",
            *verdicts(results),
            "",
            f"![loss curves]({png})",
            "",
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = fit_parser(__doc__.split("\n\n")[0], REPO / "runs" / "train_compare")
    parser.add_argument(
        "--corpus",
        default=str(DEFAULT_CORPUS),
        help="'demo' or a text file of documents separated by --document-separator lines "
        "(default: the public-domain novel committed under tests/corpus)",
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        default=list(DEFAULT_RUNS),
        metavar="ARCH:LR[:TABLE_LR_X]",
        help="the runs to compare: architecture, peak learning rate, tables' lr multiplier "
        "(the defaults follow the paper: MemoryFormer at 3x the baseline's learning rate)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of initialisation and training windows")
    args = parser.parse_args(argv)
    try:
        args.runs = [parse_run(text) for text in args.runs]
    except ValueError as error:
        parser.error(str(error))
    check_fit_args(parser, args)
    args.corpus = corpus_path(parser, args.corpus)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/train_compare.py", *(sys.argv[1:] if argv is None else argv)])
    results, device = [], "cpu"
    for spec in args.runs:
        result, device = train(args, spec)
        results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    kind = device_slug(device)
    png = args.out / f"train_compare_{kind}_loss.png"
    plot(results, args, png)
    write_result(f"train_compare_{kind}.md", report(results, args, device, command, png.name), args.out)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
