"""MemoryFormer against the baseline Transformer of the same width and depth, trained on the same real text.

    python benchmarks/train_compare.py [--corpus ../shared/corpora/fortunes.txt | demo] [--steps 300]
        [--preset debug] [--overrides "{n_layer: 4, n_embd: 128, max_seq_len: 256}"]
        [--runs transformer:1e-3 memoryformer:3e-3 ...] [--out benchmarks/results]

Every run is a real ``mf fit --config configs/quickstart.yaml`` (in-process, through
``mf_lightning.cli.main``) on a fortune file split into documents at ``%`` lines, or on the embedded
``demo`` corpus (byte-level by default), with the
same preset, overrides, seed, steps, batch and sequence length; only the architecture and the learning
rate (and optionally the tables' learning-rate multiplier) differ, as each of ``--runs ARCH:LR[:TABLE_LR_X] ...``
says. Checkpoints and the Memory Layer monitors are switched off so they cost no time. The figures come
from each run's TensorBoard events (``train/loss``, ``val/loss``, ``val/ppl``, ``val/bpb`` and the
ThroughputMonitor's ``train/time`` and ``train/lengths``); FLOPs/token from
``model.network.flops_per_token(seq_len)``. Writes ``train_compare_<device>.md`` (settings, command and a
side-by-side table, each MemoryFormer run's validation loss against the first Transformer run's) and
``train_compare_<device>_loss.png`` (training and validation loss against tokens) into ``--out``.

Bytes rather than a BPE by default: with 257 ids the embedding and LM head stay small, so the comparison
is between the blocks (with a BPE of a few thousand ids the head would hold most of a small baseline's
parameters and FLOPs), and nothing is trained before the runs. One torch thread by default: on a CPU
shared with other jobs, extra threads mostly wait for each other, and with one thread MemoryFormer runs
repeat bit for bit.

This module is also the runner of ``benchmarks/ablations.py``: :func:`train` fits one :class:`RunSpec`
(which may set further ``ModelConfig`` fields) and caches its :class:`RunResult` beside the run's logs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mf_lightning.cli import main as mf_main
from mf_lightning.config import ARCHS

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
DEFAULT_RUNS = ("transformer:1e-3", "memoryformer:3e-3")
GOAL = 0.05
"""MemoryFormer's validation loss may exceed the baseline's by at most this fraction at equal tokens."""
SMOOTHING = 0.6
"""Exponential moving-average weight of the plotted training-loss curves."""


@dataclass(frozen=True)
class RunSpec:
    """What differs between the compared runs: the architecture, its learning rates and model fields.

    ``overrides`` are ``(field, value)`` pairs of ``ModelConfig`` set on top of the shared ``--overrides``.
    """

    arch: str
    lr: float
    table_lr_multiplier: float = 1.0
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        tables = f", tables x{self.table_lr_multiplier:g}" if self.table_lr_multiplier != 1 else ""
        fields = "".join(f", {key}={value}" for key, value in self.overrides)
        return f"{self.arch} lr {self.lr:g}{tables}{fields}"

    @property
    def folder(self) -> str:
        fields = "".join(f"_{key}{value}" for key, value in self.overrides)
        return f"{self.arch}_lr{self.lr:g}_tables{self.table_lr_multiplier:g}{fields}"


@dataclass
class RunResult:
    """One finished run: its settings, model size and cost, and the scalars read back from TensorBoard."""

    spec: RunSpec
    parameters: int
    flops_per_token: int
    fit_seconds: float
    recipe: str
    scalars: dict[str, list[tuple[int, float]]]
    extras: dict[str, float] = field(default_factory=dict)
    """Figures an ``inspect`` function of :func:`train` measured on the trained model."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunResult:
        values = json.loads(text)
        spec = values.pop("spec")
        spec["overrides"] = tuple(tuple(pair) for pair in spec["overrides"])
        scalars = {tag: [tuple(point) for point in points] for tag, points in values.pop("scalars").items()}
        return cls(RunSpec(**spec), scalars=scalars, **values)

    def last(self, tag: str) -> float:
        return self.scalars[tag][-1][1]

    def tokens_per_second(self) -> float:
        """Median training tokens/s of the ThroughputMonitor's logging windows, the first (warm-up) left out.

        The median, not the overall mean, so bursts of other work on a shared machine do not decide it.
        """
        lengths = dict(self.scalars["train/lengths"])
        times = self.scalars["train/time"]
        return statistics.median(
            (lengths[step] - lengths[previous]) / (seconds - previous_seconds)
            for (previous, previous_seconds), (step, seconds) in zip(times, times[1:])
        )


def parse_run(text: str) -> RunSpec:
    """``ARCH:LR[:TABLE_LR_MULTIPLIER]``, e.g. ``memoryformer:3e-3`` or ``memoryformer:3e-3:2``."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ARCHS:
        raise ValueError(
            f"--runs {text!r} must be ARCH:LR[:TABLE_LR_MULTIPLIER] with ARCH one of {', '.join(ARCHS)}"
        )
    try:
        numbers = [float(part) for part in parts[1:]]
    except ValueError:
        raise ValueError(f"--runs {text!r}: learning rate and multiplier must be numbers") from None
    if not all(math.isfinite(number) and number > 0 for number in numbers):
        raise ValueError(f"--runs {text!r}: the learning rate and multiplier must be positive")
    return RunSpec(parts[0], *numbers)


def fit_args(args: argparse.Namespace, spec: RunSpec, root: Path) -> list[str]:
    """The ``mf fit`` arguments of one run: quickstart config, the shared settings, then the run's own.

    The bucket-usage monitor runs only with ``args.bucket_every`` > 0, logging every that many steps.
    """
    is_file = args.corpus != "demo"
    overrides = {**yaml.safe_load(args.overrides), **dict(spec.overrides)}
    monitor = {"bucket_usage.enabled": args.bucket_every > 0}
    if args.bucket_every:
        monitor.update({"bucket_usage.log_every_n_steps": args.bucket_every,
                        "bucket_usage.image_every_n_steps": args.steps})
    settings = {
        "seed_everything": args.seed,
        "trainer.default_root_dir": root,
        "trainer.max_steps": args.steps,
        "validation.every_n_steps": args.val_every,
        "trainer.limit_val_batches": args.val_batches,
        "trainer.log_every_n_steps": args.log_every,
        "trainer.enable_progress_bar": False,
        "checkpoint.save_top_k": 0,
        "checkpoint.save_last": False,
        **monitor,
        "gradient_coverage.enabled": False,
        "data.source": args.corpus,
        "data.document_separator": "%" if is_file else "null",
        "data.tokenizer": args.tokenizer,
        "data.seq_len": args.seq_len,
        "data.batch_size": args.batch_size,
        "data.val_windows": args.val_batches * args.batch_size,
        "data.seed": args.seed,
        "model.arch": spec.arch,
        "model.preset": args.preset,
        "model.overrides": json.dumps(overrides),
        "model.lr": spec.lr,
        "model.table_lr_multiplier": spec.table_lr_multiplier,
    }
    return ["fit", "--config", str(QUICKSTART), *(f"--{key}={value}" for key, value in settings.items())]


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the TensorBoard events in ``log_dir`` as ``[(step, value), ...]``."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def train(
    args: argparse.Namespace, spec: RunSpec, inspect: Callable[[Any], dict[str, float]] | None = None
) -> tuple[RunResult, str]:
    """Fits one run under ``--runs-dir`` and reads its TensorBoard events back; returns it and the device.

    ``inspect(cli)`` may measure the trained model into ``RunResult.extras``. The result is cached as
    ``result.json`` in the run's folder with its ``mf fit`` arguments: ``args.reuse`` returns a cached
    result of the same arguments instead of training again (so an interrupted study resumes).
    """
    root = args.runs_dir / spec.folder
    arguments = fit_args(args, spec, root)
    if getattr(args, "reuse", False):
        cached = cached_result(args, spec)
        if cached is not None:
            print(f"== {spec.label}: reusing {root / 'result.json'}", flush=True)
            return cached
    shutil.rmtree(root, ignore_errors=True)
    print(f"== {spec.label}: mf {shlex.join(arguments)}", flush=True)
    start = time.perf_counter()
    cli = mf_main(arguments)
    fit_seconds = time.perf_counter() - start
    network = cli.model.network
    result = RunResult(
        spec,
        network.num_parameters(),
        network.flops_per_token(args.seq_len),
        fit_seconds,
        recipe(cli),
        read_scalars(root / "tensorboard"),
        inspect(cli) if inspect else {},
    )
    device = device_name(cli.trainer.strategy.root_device)
    (root / "result.json").write_text(json.dumps({"arguments": [str(a) for a in arguments], "device": device, "result": result.to_json()}))
    return result, device


def cached_result(args: argparse.Namespace, spec: RunSpec) -> tuple[RunResult, str] | None:
    """The result and device :func:`train` cached for ``spec`` under these ``args``, or None if there is none."""
    root = args.runs_dir / spec.folder
    cache = root / "result.json"
    if not cache.is_file():
        return None
    cached = json.loads(cache.read_text())
    if cached["arguments"] != [str(argument) for argument in fit_args(args, spec, root)]:
        return None
    return RunResult.from_json(cached["result"]), cached["device"]


def recipe(cli: Any) -> str:
    """The optimisation settings of a run, as the LightningModule and the Trainer recorded them."""
    hp, trainer = cli.model.hparams, cli.trainer
    return (
        f"AdamW{tuple(hp['betas'])}, eps {hp['eps']:g}, weight decay {hp['weight_decay']:g}, "
        f"{100 * hp['warmup_fraction']:g}% warm-up then cosine to {100 * hp['min_lr_ratio']:g}% of peak, "
        f"gradient clipping {trainer.gradient_clip_val:g}, precision {trainer.precision}"
    )


def device_name(device: torch.device) -> str:
    """``cpu, <CPU model> (...)`` with its logical CPUs and torch's thread count, or ``cuda, <GPU name>``."""
    if device.type == "cuda":
        return f"cuda, {torch.cuda.get_device_name(device)}"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    name = models[0] if models else platform.processor() or platform.machine()
    return f"cpu, {name} ({os.cpu_count()} logical CPUs), torch threads: {torch.get_num_threads()}"


def display_path(path: Path | str) -> str:
    """``path`` relative to the repository root when that is shorter (it is for the default corpus)."""
    if path == "demo":
        return "demo (embedded)"
    relative = os.path.relpath(path, REPO)
    return relative if len(relative) < len(str(path)) else str(path)


def tokens_per_step(args: argparse.Namespace) -> int:
    """Training tokens per optimizer step (one device, no gradient accumulation)."""
    return args.batch_size * args.seq_len


def first_transformer(results: list[RunResult]) -> RunResult | None:
    """The baseline the MemoryFormer runs are measured against."""
    return next((result for result in results if result.spec.arch == "transformer"), None)


def excess_loss(result: RunResult, baseline: RunResult) -> float:
    """Relative excess of ``result``'s final validation loss over ``baseline``'s (0.05 = 5% higher)."""
    return result.last("val/loss") / baseline.last("val/loss") - 1


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
        best = min(value for _, value in result.scalars["val/loss"])
        rows.append(
            f"| {spec.arch} | {spec.lr:g} | {spec.table_lr_multiplier:g} "
            f"| {result.parameters / 1e6:.2f} M | {result.flops_per_token / 1e6:.2f} M "
            f"| {args.steps * tokens_per_step(args):,} "
            f"| {result.last('val/loss'):.4f} | {result.last('val/ppl'):.3f} | {result.last('val/bpb'):.4f} "
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
        for axes, tag in ((train_axes, "train/loss"), (val_axes, "val/loss")):
            steps, values = zip(*result.scalars[tag])
            tokens = [(step + 1) * tokens_per_step(args) for step in steps]
            if tag == "train/loss":
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
            f"- device: {device}; torch {torch.__version__}; "
            f"date {datetime.date.today().isoformat()}",
            f"- command: `{command}`",
            f"- settings shared by every run: `configs/quickstart.yaml` with corpus `{display_path(args.corpus)}` "
            f"{'split at `%` lines' if args.corpus != 'demo' else ''}, tokenizer `{args.tokenizer}`, preset `{args.preset}`, overrides `{args.overrides}`, "
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


def shared_parser(description: str, runs_dir: Path) -> argparse.ArgumentParser:
    """The options every comparison shares (this script's and ``ablations.py``'s): sizes, steps, logging."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="debug", help="model preset shared by every run")
    parser.add_argument("--overrides", default="{n_layer: 4, n_embd: 128, max_seq_len: 256}",
                        help="model.overrides (YAML dict of ModelConfig fields) shared by every run")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    parser.add_argument("--tokenizer", default="byte", help="data.tokenizer (byte, bpe:<vocab>, or a path)")
    parser.add_argument("--val-every", type=int, default=50, help="validate every this many steps")
    parser.add_argument("--val-batches", type=int, default=20, help="validation batches (the same windows each time)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: least disturbed by other jobs on a shared CPU)")
    parser.add_argument("--log-every", type=int, default=10, help="log training scalars every this many steps")
    parser.add_argument("--bucket-every", type=int, default=0,
                        help="log the bucket-usage monitor every this many steps (0: monitor off)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a run's cached result.json when its mf fit arguments are unchanged")
    parser.add_argument("--runs-dir", type=Path, default=runs_dir,
                        help="TensorBoard logs, one folder per run (replaced when the run is repeated)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="folder for the markdown table and the plot")
    return parser


def check_shared(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject shared options that would make a run fail late or its figures meaningless."""
    for name in ("steps", "batch_size", "seq_len", "val_every", "val_batches", "threads", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.steps % args.val_every:
        parser.error(
            f"--steps={args.steps} must be a multiple of --val-every={args.val_every} so the last step is validated"
        )
    if args.steps <= args.log_every:
        parser.error(f"--steps={args.steps} must exceed --log-every={args.log_every} to measure tokens/s after warm-up")
    if args.bucket_every < 0 or (args.bucket_every and args.steps % args.bucket_every):
        parser.error(
            f"--bucket-every={args.bucket_every} must be 0 or divide --steps={args.steps}, so the last window ends "
            "at the last step"
        )
    try:
        overrides = yaml.safe_load(args.overrides)
    except yaml.YAMLError as error:
        parser.error(f"--overrides {args.overrides!r} is not YAML: {error}")
    if not isinstance(overrides, dict):
        parser.error(f"--overrides must be a YAML dict of ModelConfig fields, got {args.overrides!r}")


def corpus_path(parser: argparse.ArgumentParser, text: str) -> Path | str:
    """``demo`` (the embedded corpus) or a resolved text file of documents separated by ``%`` lines."""
    if text == "demo":
        return text
    path = Path(text)
    if not path.is_file():
        parser.error(f"corpus {text} is not a file; give 'demo' or a text file of documents separated by '%' lines")
    return path.resolve()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = shared_parser(__doc__.split("\n\n")[0], REPO / "runs" / "train_compare")
    parser.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpora" / "fortunes.txt"),
                        help="'demo' or a fortune-style text file, documents separated by '%%' lines")
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), metavar="ARCH:LR[:TABLE_LR_X]",
                        help="the runs to compare: architecture, peak learning rate, tables' lr multiplier "
                        "(the defaults follow the paper: MemoryFormer at 3x the baseline's learning rate)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of initialisation and training windows")
    args = parser.parse_args(argv)
    try:
        args.runs = [parse_run(text) for text in args.runs]
    except ValueError as error:
        parser.error(str(error))
    check_shared(parser, args)
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
    kind = device.split(",")[0]
    png = args.out / f"train_compare_{kind}_loss.png"
    plot(results, args, png)
    text = report(results, args, device, command, png.name)
    markdown = args.out / f"train_compare_{kind}.md"
    markdown.write_text(text)
    print(text)
    print(f"wrote {markdown} and {png}")


if __name__ == "__main__":
    main()
