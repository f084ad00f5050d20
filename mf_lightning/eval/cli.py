"""``mf eval``: zero-shot (or few-shot) lm-evaluation-harness tasks on a trained run or an exported model.

``mf eval --config runs/x/tensorboard/config.yaml --ckpt_path last`` evaluates a run's checkpoint, writes
the harness's JSON to ``runs/x/eval/`` and logs ``tasks/<task>/<metric>`` there, as a TensorBoard run beside
the training, at the checkpoint's step; ``mf eval --model_dir DIR`` evaluates a folder written by ``mf export`` and writes the JSON
to ``eval/<DIR's name>.json`` under the working directory (never into the model folder, which ``mf export``
replaces whole and which may be read-only or shared). The default
tasks are the paper's Table 1: piqa, winogrande, wsc, arc_easy, arc_challenge, logiqa (their data is
downloaded from the Hugging Face Hub on first use). Options keep the harness's names and meanings.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace

from mf_lightning.config_errors import OneLineArgumentParser
from mf_lightning.eval import PAPER_TASKS, MissingExtra
from mf_lightning.eval.report import (
    Row,
    comparison_table,
    format_table,
    log_to_tensorboard,
    read_json,
    result_rows,
    task_tag,
    write_json,
)
from mf_lightning.lit.checkpoint_files import load_file
from mf_lightning.lit.distributed_checkpoint import is_sharded_checkpoint, read_metadata
from mf_lightning.lit.loading import LAST, load_for_inference, resolve_checkpoint
from mf_lightning.lit.run_folders import CHECKPOINTS, EVAL, RunFolders, run_folders

DEFAULT_BATCH_SIZE = 8
DEFAULT_SEED = 1234


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="mf eval", description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model (a run, or an exported folder)")
    model.add_argument("--config", help="the run's config (<run>/tensorboard/config.yaml)")
    model.add_argument(
        "--ckpt_path",
        help=f"'{LAST}' or a .ckpt file (or sharded checkpoint folder) of the run (default: {LAST} with --config)",
    )
    model.add_argument("--model_dir", help="a folder written by mf export (config.json, model.safetensors, tokenizer)")
    parser.add_argument(
        "--tasks", default=",".join(PAPER_TASKS), help="comma-separated task names (default: %(default)s)"
    )
    parser.add_argument("--num_fewshot", type=int, help="examples in each prompt (default: each task's own, usually 0)")
    parser.add_argument(
        "--limit", type=float, help="at most this many examples per task (a fraction when < 1); for testing"
    )
    parser.add_argument(
        "--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="sequences per forward pass (default: %(default)s)"
    )
    parser.add_argument("--include_path", action="append", default=[], help="a folder of task YAML files (repeatable)")
    parser.add_argument(
        "--output_path",
        help="results JSON file or folder, outside --model_dir (default: <run>/eval/, or ./eval/<model_dir's name>.json)",
    )
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="seeds Python, NumPy, torch and few-shot sampling (default: %(default)s)",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="JSON",
        help="only print results files of several models side by side (Table 1 layout)",
    )
    return parser


def main(argv: Sequence[str], read_config: Callable[[Sequence[str]], Namespace]) -> None:
    """``mf eval``: check the arguments, load the model (a run's config read with ``read_config``, ``mf fit``'s
    parser), run the tasks, print the table, save the results."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        print(comparison_table({Path(path).stem: read_json(path) for path in args.compare}))
        return
    tasks = check_args(parser, args)
    try:
        from mf_lightning.eval.harness import evaluate
    except MissingExtra as error:
        print(f"mf: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    is_run = args.model_dir is None
    ckpt_path = args.ckpt_path or LAST
    run = run_folders(read_config([args.config]), args.config) if args.config else None
    model, tokenizer = load_for_inference(
        run, ckpt_path=ckpt_path if is_run else None, model_dir=args.model_dir, device=device
    )
    results = evaluate(
        model, tokenizer, tasks, args.num_fewshot, args.limit, args.batch_size, args.include_path, args.seed
    )
    rows = result_rows(results)
    print(format_table(rows))
    if is_run:
        checkpoint = resolve_checkpoint(ckpt_path, run)
        save_run_results(results, rows, checkpoint, run or run_of(checkpoint), args.output_path)
    else:
        print(f"results: {write_json(results, args.output_path or model_results_path(args.model_dir))}")


def model_results_path(model_dir: str) -> Path:
    """Where the results of the exported model ``model_dir`` go by default: ``eval/<its name>.json`` here."""
    return Path("eval") / f"{Path(os.path.abspath(model_dir)).name}.json"


def save_run_results(
    results: dict[str, Any], rows: list[Row], checkpoint: Path, run: RunFolders | None, output_path: str | None
) -> None:
    """Writes a run's results JSON (default ``<run>/eval/<ckpt>-step<N>.json``) and, when the run logs to
    TensorBoard, logs them beside its training as the TensorBoard run ``<run>/eval`` (as ``mf validate`` and
    ``mf test`` do: never into the training's own events folder)."""
    step = checkpoint_step(checkpoint)
    default = (run.root / EVAL if run else checkpoint.parent) / f"{checkpoint.stem}-step{step}.json"
    print(f"results: {write_json(results, output_path or default)}")
    if run is None:
        print(f"not logged to TensorBoard: {checkpoint} is not in a run's checkpoints/ folder; pass the run's --config")
    elif not run.tensorboard:
        print(f"not logged to TensorBoard: the run logs with {run.logger or 'no logger'}, not TensorBoardLogger")
    else:
        log_to_tensorboard(rows, run.root / EVAL, step)
        print(f"TensorBoard: {task_tag('<task>', '<metric>')} at step {step} in {run.root / EVAL}")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The task names; any argument that cannot work ends with argparse's usage error naming it."""
    if args.model_dir is not None and (args.config is not None or args.ckpt_path is not None):
        parser.error("give either --model_dir, or --config with --ckpt_path, not both")
    if args.model_dir is None and args.config is None and args.ckpt_path in (None, LAST):
        parser.error(f"give --model_dir DIR, or --config RUN_CONFIG (with --ckpt_path {LAST}|FILE)")
    if (
        args.model_dir is not None
        and args.output_path is not None
        and Path(os.path.abspath(args.output_path)).is_relative_to(os.path.abspath(args.model_dir))
    ):
        parser.error(
            f"--output_path {args.output_path} is inside --model_dir {args.model_dir}: write the results outside "
            f"the model folder (default: {model_results_path(args.model_dir)})"
        )
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        parser.error(f"--tasks needs at least one task name, got {args.tasks!r}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        parser.error(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and not args.limit > 0:
        parser.error(f"--limit must be > 0 (examples per task, or a fraction < 1), got {args.limit}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device} needs a CUDA GPU, and torch sees none here; use --device cpu")
    return tasks


def run_of(checkpoint: Path) -> RunFolders | None:
    """The folders of the run a checkpoint given without ``--config`` lies in (the default layout: its folder is
    ``<run>/checkpoints``), or None when it lies in no run's checkpoint folder."""
    if checkpoint.parent.name != CHECKPOINTS:
        return None
    return run_folders({"trainer": {"default_root_dir": str(checkpoint.parent.parent)}})


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a Lightning checkpoint was saved at (read through a memory map: no weights are loaded;
    of a sharded checkpoint folder only its ``meta.pt``)."""
    if is_sharded_checkpoint(checkpoint):
        return int(read_metadata(checkpoint).get("global_step", 0))
    state: dict[str, Any] = load_file(checkpoint, mmap=True)
    return int(state.get("global_step", 0))
