"""What every benchmark script shares: the device, timing, markdown tables, result files and `mf fit` runs.

Scripts under ``benchmarks/`` import this module and never one another, so what a script needs is what it
imports here plus its own imports: this module pulls in no plotting library (the GPU image has none).
A script run as ``python benchmarks/<name>.py`` finds it on ``sys.path`` as its own folder.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shlex
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The device and timing helpers live in the package, where `mf doctor` measures with them too; re-exported here.
from mf_lightning.doctor.machine import cpu_model, device_name
from mf_lightning.doctor.machine import device_slug as device_slug
from mf_lightning.doctor.timing import median_seconds as median_seconds
from mf_lightning.doctor.timing import synchronize as synchronize

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO / "tests" / "corpus" / "frankenstein_pg84.txt"
"""A small real corpus every clone has: a public-domain novel (tests/corpus/README.md), paragraphs as documents."""
RESULTS = REPO / "benchmarks" / "results"
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def cpu_description() -> str:
    """The CPU's model and its logical CPUs, without importing torch (for scripts that measure memory)."""
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs)"


def environment(device: torch.device | str = "cpu") -> str:
    """One line for a result file's header: device, torch, date and the machine's load (speed figures are noisy)."""
    import torch

    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"device: {device_name(device)}; torch {torch.__version__}; date {datetime.date.today().isoformat()}; "
        f"load average (1/5/15 min) {load}"
    )


def median_wall_seconds(action: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``action``, for actions too long to autorange."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def write_result(name: str, text: str, out: Path = RESULTS) -> Path:
    """Writes ``text`` to ``out/<name>``, prints it and where it went, and returns the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(text if text.endswith("\n") else text + "\n")
    print(text)
    print(f"wrote {path}")
    return path


def display_path(path: Path | str) -> str:
    """``path`` relative to the repository root when that is shorter; ``demo`` names the embedded corpus."""
    if path == "demo":
        return "demo (embedded)"
    relative = os.path.relpath(path, REPO)
    return relative if len(relative) < len(str(path)) else str(path)


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the TensorBoard events in ``log_dir`` as ``[(step, value), ...]``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@dataclass(frozen=True)
class RunSpec:
    """What differs between compared ``mf fit`` runs: the architecture, its learning rates and model fields.

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
            for (previous, previous_seconds), (step, seconds) in itertools.pairwise(times)
        )


def tokens_per_step(args: argparse.Namespace) -> int:
    """Training tokens per optimizer step (one device, no gradient accumulation)."""
    return args.batch_size * args.seq_len


def fit_args(args: argparse.Namespace, spec: RunSpec, root: Path) -> list[str]:
    """The ``mf fit`` arguments of one run: quickstart config, the shared settings, then the run's own.

    The bucket-usage monitor runs only with ``args.bucket_every`` > 0, logging every that many steps.
    """
    import yaml

    is_file = args.corpus != "demo"
    overrides = {**yaml.safe_load(args.overrides), **dict(spec.overrides)}
    monitor = {"bucket_usage.enabled": args.bucket_every > 0}
    if args.bucket_every:
        monitor.update(
            {"bucket_usage.log_every_n_steps": args.bucket_every, "bucket_usage.image_every_n_steps": args.steps}
        )
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
        "data.document_separator": args.document_separator if is_file else "null",
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


def train(
    args: argparse.Namespace, spec: RunSpec, inspect: Callable[[Any], dict[str, float]] | None = None
) -> tuple[RunResult, str]:
    """Fits one run under ``--runs-dir`` and reads its TensorBoard events back; returns it and its device (``cpu``, ``cuda:0``).

    ``inspect(cli)`` may measure the trained model into ``RunResult.extras``. The result is cached as
    ``result.json`` in the run's folder with its ``mf fit`` arguments: ``args.reuse`` returns a cached
    result of the same arguments instead of training again (so an interrupted study resumes).
    """
    from mf_lightning.cli import main as mf_main

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
    device = str(cli.trainer.strategy.root_device)
    payload = {"arguments": [str(a) for a in arguments], "device": device, "result": result.to_json()}
    (root / "result.json").write_text(json.dumps(payload))
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


def fit_parser(description: str, runs_dir: Path) -> argparse.ArgumentParser:
    """The options every comparison of ``mf fit`` runs shares: sizes, steps, logging, where runs and results go."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="debug", help="model preset shared by every run")
    parser.add_argument(
        "--overrides",
        default="{n_layer: 4, n_embd: 128, max_seq_len: 256}",
        help="model.overrides (YAML dict of ModelConfig fields) shared by every run",
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    parser.add_argument("--tokenizer", default="byte", help="data.tokenizer (byte, bpe:<vocab>, or a path)")
    parser.add_argument("--val-every", type=int, default=50, help="validate every this many steps")
    parser.add_argument("--val-batches", type=int, default=20, help="validation batches (the same windows each time)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: least disturbed by other jobs on a shared CPU)",
    )
    parser.add_argument("--log-every", type=int, default=10, help="log training scalars every this many steps")
    parser.add_argument(
        "--document-separator",
        default="",
        help="the line that separates the documents of a corpus file: '' (a blank line, the default, for prose such "
        "as the committed tests/corpus text) or '%%' (fortune files)",
    )
    parser.add_argument(
        "--bucket-every",
        type=int,
        default=0,
        help="log the bucket-usage monitor every this many steps (0: monitor off)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="reuse a run's cached result.json when its mf fit arguments are unchanged"
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=runs_dir,
        help="TensorBoard logs, one folder per run (replaced when the run is repeated)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the markdown table and the plot")
    return parser


def check_fit_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject shared options that would make a run fail late or its figures meaningless."""
    import yaml

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
    """``demo`` (the embedded corpus) or a resolved text file (of documents separated by ``--document-separator``)."""
    if text == "demo":
        return text
    path = Path(text)
    if not path.is_file():
        parser.error(f"corpus {text} is not a file; give 'demo' or a text file of documents")
    return path.resolve()
