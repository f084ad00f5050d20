"""Short ``mf fit`` runs on one GPU: training tokens/s, step time and peak GPU memory, as one table.

For each config (default MemoryFormer-tiny and Transformer-tiny) with and without ``model.compile``, it
fits ``--steps`` optimizer steps on the demo corpus in bf16-mixed precision with no gradient
accumulation (one micro-batch of the config's batch size and sequence length per step), bucket
monitoring on as in every ``mf fit``, no validation or checkpoints. Tokens/s and step time are the
medians over the ThroughputMonitor's logging windows, the first (warm-up, compilation) left out; peak
memory is ``torch.cuda.max_memory_allocated`` over the run.

    python benchmarks/gpu_train.py                      # writes results/gpu_train_<gpu>.md
    python benchmarks/gpu_train.py --steps 40 --configs configs/memoryformer_tiny.yaml

``--accelerator cpu`` with ``--set`` overrides (e.g. ``model.preset=debug data.seq_len=32``) runs the same
path on a CPU: the GPU suite's rehearsal uses it to catch a missing import or a wrong path before the
device does. It imports only ``mf_lightning`` and what the GPU image has (torch, tensorboard).
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import shlex
import shutil
import statistics
import sys

import torch
from harness import REPO, RESULTS, device_slug, environment, read_scalars

from mf_lightning.cli import main as mf_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tiny = [REPO / "configs/memoryformer_tiny.yaml", REPO / "configs/transformer_tiny.yaml"]
    parser.add_argument("--configs", nargs="+", type=pathlib.Path, default=tiny)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10, help="optimizer steps per logging window")
    parser.add_argument("--compile", nargs="+", choices=["false", "true"], default=["false", "true"])
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="further mf fit settings, e.g. model.preset=debug (the rehearsal's tiny shapes)")  # fmt: skip
    parser.add_argument("--runs-dir", type=pathlib.Path, default=REPO / "runs" / "gpu_train")
    parser.add_argument("--output", type=pathlib.Path, default=None, help="default: results/gpu_train_<gpu>.md")
    args = parser.parse_args(argv)
    if args.log_every < 1 or args.steps < 3 * args.log_every:
        parser.error(f"--steps={args.steps} must be at least 3 x --log-every={args.log_every}: the first logging "
                     "window is warm-up, and a median needs two more")  # fmt: skip
    for setting in args.set:
        if "=" not in setting:
            parser.error(f"--set {setting!r} is not KEY=VALUE (e.g. model.preset=debug)")
    return args


def fit_args(config: pathlib.Path, compile_model: str, args: argparse.Namespace, root: pathlib.Path) -> list[str]:
    settings = {
        "trainer.default_root_dir": root,
        "trainer.accelerator": args.accelerator,
        "trainer.max_steps": args.steps,
        "trainer.precision": "bf16-mixed",
        "trainer.accumulate_grad_batches": 1,
        "trainer.limit_val_batches": 0,
        "trainer.num_sanity_val_steps": 0,
        "trainer.log_every_n_steps": args.log_every,
        "trainer.enable_progress_bar": False,
        "checkpoint.save_top_k": 0,
        "checkpoint.save_last": False,
        "data.source": "demo",
        "model.compile": compile_model,
        **dict(setting.split("=", 1) for setting in args.set),
    }
    return ["fit", "--config", str(config), *(f"--{key}={value}" for key, value in settings.items())]


def window_medians(scalars: dict[str, list[tuple[int, float]]]) -> tuple[float, float]:
    """(tokens/s, seconds per step): medians over logging windows after the first."""
    lengths = dict(scalars["train/lengths"])
    times = scalars["train/time"][1:]
    pairs = list(itertools.pairwise(times))
    tokens_per_second = statistics.median((lengths[b] - lengths[a]) / (tb - ta) for (a, ta), (b, tb) in pairs)
    step_seconds = statistics.median((tb - ta) / (b - a) for (a, ta), (b, tb) in pairs)
    return tokens_per_second, step_seconds


def run(args: argparse.Namespace, config: pathlib.Path, compile_model: str) -> dict[str, object]:
    """Fit one configuration and return its measurements."""
    root = args.runs_dir / f"{config.stem}_compile_{compile_model}"
    shutil.rmtree(root, ignore_errors=True)
    command = fit_args(config, compile_model, args, root)
    print(f"== mf {shlex.join(command)}", flush=True)
    on_gpu = args.accelerator == "gpu"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    cli = mf_main(command)
    tokens_per_second, step_seconds = window_medians(read_scalars(root / "tensorboard"))
    data = cli.datamodule
    return {
        "config": config.stem,
        "compile": compile_model,
        "batch": f"{data.batch_size} x {data.seq_len}",
        "tokens_per_second": tokens_per_second,
        "step_ms": step_seconds * 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
    }


def table_line(result: dict[str, object]) -> str:
    return (
        f"| {result['config']} | {result['compile']} | {result['batch']} | {result['tokens_per_second']:,.0f} | "
        f"{result['step_ms']:.0f} | {gib(result['peak_gib'])} |"
    )


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def goals(results: list[dict[str, object]]) -> list[str]:
    """MemoryFormer-tiny trains at least as many tokens/s as Transformer-tiny (same batch), within 80 GB."""
    by_run = {(r["config"], r["compile"]): r for r in results}
    lines = []
    for compile_model in ("false", "true"):
        memoryformer = by_run.get(("memoryformer_tiny", compile_model))
        transformer = by_run.get(("transformer_tiny", compile_model))
        if memoryformer and transformer:
            ratio = memoryformer["tokens_per_second"] / transformer["tokens_per_second"]
            verdict = "met" if ratio >= 1 else "MISSED"
            lines.append(f"- compile {compile_model}: MemoryFormer-tiny tokens/s >= Transformer-tiny's: {verdict} "
                         f"({ratio:.2f}x)")  # fmt: skip
        if memoryformer and memoryformer["peak_gib"] is not None:
            verdict = "met" if memoryformer["peak_gib"] * 2**30 <= 80e9 else "MISSED"
            lines.append(f"- compile {compile_model}: MemoryFormer-tiny micro-batch within 80 GB: {verdict} "
                         f"({memoryformer['peak_gib']:.1f} GiB peak)")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("gpu_train.py: no CUDA GPU here (--accelerator cpu rehearses the same path on the CPU)")
    results = [run(args, config, compile_model) for config in args.configs for compile_model in args.compile]
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    command = shlex.join(["python", "benchmarks/gpu_train.py", *(sys.argv[1:] if argv is None else argv)])
    text = "\n".join([
        "# Training throughput",
        "",
        f"- {environment(device)}",
        f"- command: `{command}`",
        f"- {args.steps} optimizer steps, bf16-mixed, no accumulation, demo corpus, bucket monitoring on"
        + (f"; settings {' '.join(args.set)}" if args.set else ""),
        "- tokens/s and step time: medians of the logging windows after the first (warm-up, compilation)",
        "",
        "| config | compile | micro-batch | train tokens/s | step ms | peak GPU GiB |",
        "|---|---|---|---:|---:|---:|",
        *map(table_line, results),
        "",
        "## Goals",
        "",
        *goals(results),
        "",
    ])  # fmt: skip
    output = args.output or RESULTS / f"gpu_train_{device_slug(device)}.md"
    output.write_text(text)
    print(f"\n{text}\nwritten to {output}")


if __name__ == "__main__":
    main()
