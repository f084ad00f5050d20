"""The paper's ablations and the bucket-collapse remedies, rerun at small scale on real text, equal tokens.

    python benchmarks/ablations.py --corpora tests/corpus/frankenstein_pg84.txt demo [--seeds 1 2] [--jobs 2]
        [--steps 150] [--overrides "{n_layer: 2, n_embd: 80, n_head: 2, max_seq_len: 64}"] [--reuse]

Each ablation varies one thing of the paper's model (MemoryFormer, lr 3e-3, tau 8, 2 extra feed-forward
bits, ``scaled`` score, tables at the common learning rate, no remedy) and keeps the rest: extra bits
0-3, learning rate 1e-3..4e-3, tau 4/8/10 (the number of tables ``n_embd / tau`` follows, so the width
must be divisible by all three), score ``paper`` vs ``scaled``, table learning-rate multiplier 1 vs 3,
the three bucket-collapse remedies of :mod:`mf_lightning.nn.hash_input`, and the Transformer baseline at
1e-3 and 3e-3. The paper's model is the middle of several sweeps and is trained once per corpus and seed.
Every run is one ``mf fit`` of :func:`harness.train` (the same runner as ``train_compare.py``),
with the bucket-usage monitor on; ``--jobs`` runs go in parallel processes, one torch thread each.

Writes ``ablations_<device>.md`` (settings, per-run table per corpus, per-ablation verdicts, the
collapse study) and ``ablations_<device>_val.png`` (validation curves, mean over seeds, min-max shaded).
The usage figures are the ``BucketUsageMonitor``'s own scalars of the last logging window, averaged over
the blocks; the input statistics (sign bias, within-chunk bit correlation) are measured here on
validation windows at the end of training.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import re
import shlex
import statistics
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from harness import (
    DEFAULT_CORPUS,
    REPO,
    RunResult,
    RunSpec,
    cached_result,
    check_fit_args,
    corpus_path,
    device_slug,
    display_path,
    environment,
    fit_parser,
    tokens_per_step,
    train,
)
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mf_lightning.callbacks.bucket_usage import layer_usage_tag
from mf_lightning.callbacks.monitoring import memory_layers

PAPER_LR = 3e-3
LAYER_KINDS = ("qkv", "ffn_in", "ffn_out")
USAGE = ("used_fraction", "normalized_entropy", "gini")
INPUT_STATISTICS = ("sign_bias", "bit_correlation")
STAT_BATCHES = 4
"""Validation batches whose Memory Layer inputs give the end-of-training input statistics."""


def memoryformer(lr: float = PAPER_LR, table_lr_multiplier: float = 1.0, **fields: Any) -> RunSpec:
    """A MemoryFormer run; fields left out keep the paper's values (so the paper's model is one spec)."""
    return RunSpec("memoryformer", lr, table_lr_multiplier, tuple(sorted(fields.items())))


PAPER = memoryformer()


@dataclass(frozen=True)
class Ablation:
    """One thing varied: ``variants`` are ``(value, spec)``; ``paper_pairs`` the paper's ``(worse, better)``
    claims between values (empty: no claim, each variant is read against the paper's model)."""

    name: str
    variants: tuple[tuple[str, RunSpec], ...]
    paper_figures: str = ""
    paper_pairs: tuple[tuple[str, str], ...] = ()


ABLATIONS = (
    Ablation(
        "extra feed-forward bits",
        tuple((str(bits), memoryformer(**({} if bits == 2 else {"ffn_extra_bits": bits}))) for bits in range(4)),
        "val PPL 19.89 / 19.26 / 18.82 / 18.54 for 0 / 1 / 2 / 3",
        (("0", "1"), ("1", "2"), ("2", "3")),
    ),
    Ablation(
        "learning rate",
        tuple((f"{lr:g}", memoryformer(lr)) for lr in (1e-3, 2e-3, 3e-3, 4e-3)),
        "val PPL 19.86 / 19.07 / 18.82 / 18.84 for 1e-3 / 2e-3 / 3e-3 / 4e-3",
        (("0.001", "0.002"), ("0.002", "0.003")),
    ),
    Ablation(
        "code bits tau",
        tuple((str(tau), memoryformer(**({} if tau == 8 else {"code_bits": tau}))) for tau in (4, 8, 10)),
        "val PPL 19.01 / 18.82 / 18.67 for 4 / 8 / 10",
        (("4", "8"), ("8", "10")),
    ),
    Ablation("score", (("scaled", PAPER), ("paper", memoryformer(score="paper")))),
    Ablation("table lr multiplier", (("1", PAPER), ("3", memoryformer(table_lr_multiplier=3.0)))),
    Ablation(
        "collapse remedy",
        (
            ("none", PAPER),
            ("hash_centering", memoryformer(hash_centering=True)),
            ("bucket_balance_weight 0.1", memoryformer(bucket_balance_weight=0.1)),
        ),
    ),
    Ablation(
        "architecture",
        (
            ("memoryformer 3e-3", PAPER),
            ("transformer 1e-3", RunSpec("transformer", 1e-3)),
            ("transformer 3e-3", RunSpec("transformer", 3e-3)),
        ),
    ),
)


def unique_specs() -> list[RunSpec]:
    """Every run of the study once (the paper's model is shared by several ablations)."""
    return list(dict.fromkeys(spec for ablation in ABLATIONS for _, spec in ablation.variants))


def input_statistics(cli: Any) -> dict[str, float]:
    """Sign statistics of what every Memory Layer hashes, on the first validation batches, after training.

    ``sign_bias/<layer>``: mean over input features of ``|2 P(z >= 0) - 1|`` (0: each bit splits the tokens
    evenly, 1: a constant bit). ``bit_correlation/<layer>``: mean ``|correlation|`` of the sign bits of two
    different features of the same chunk (0: independent bits).
    """
    network, layers = cli.model.network.eval(), memory_layers(cli.model.network)
    signs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [
        layer.register_forward_pre_hook(lambda module, inputs, name=name: signs[name].append(inputs[0] >= 0))
        for name, layer in layers.items()
    ]
    with torch.no_grad():
        for index, (x, _) in enumerate(cli.datamodule.val_dataloader()):
            if index == STAT_BATCHES:
                break
            network(x)
    for hook in hooks:
        hook.remove()
    figures = {}
    for name, layer in layers.items():
        bits = torch.cat(signs[name]).flatten(0, -2).float() * 2 - 1
        figures[f"sign_bias/{name}"] = bits.mean(0).abs().mean().item()
        chunks = bits.view(-1, layer.num_tables, layer.code_bits)
        centred = chunks - chunks.mean(0)
        std = centred.square().mean(0).sqrt().clamp_min(1e-6)
        correlation = torch.einsum("nki,nkj->kij", centred, centred) / len(bits) / (std[:, :, None] * std[:, None])
        off_diagonal = ~torch.eye(layer.code_bits, dtype=torch.bool)
        figures[f"bit_correlation/{name}"] = correlation[:, off_diagonal].abs().mean().item()
    return figures


def run_one(args: argparse.Namespace, spec: RunSpec) -> tuple[RunResult, str]:
    """One run in a worker process: one torch thread, then :func:`harness.train`."""
    torch.set_num_threads(args.threads)
    return train(args, spec, input_statistics if spec.arch == "memoryformer" else None)


def corpus_args(args: argparse.Namespace, corpus: Path | str, seed: int) -> argparse.Namespace:
    """The shared settings for one corpus and seed, with its own runs folder."""
    name = "demo" if corpus == "demo" else Path(corpus).stem
    return argparse.Namespace(
        **{**vars(args), "corpus": corpus, "seed": seed, "runs_dir": args.runs_dir / name / f"seed{seed}"}
    )


Results = dict[tuple[str, int, RunSpec], RunResult]


def run_study(args: argparse.Namespace, command: str) -> tuple[Results, str]:
    """Every unique run for every corpus and seed, ``args.jobs`` at a time; results keyed by (corpus, seed, spec).

    The markdown report is rewritten after every finished run, so an interrupted study leaves its partial
    results (labelled so); a run that fails is reported with its traceback and left out.
    """
    jobs = [(corpus, seed, spec) for corpus in args.corpora for seed in args.seeds for spec in unique_specs()]
    results: Results = {}
    device = "cpu"

    def finished(job: tuple[Path | str, int, RunSpec], outcome: tuple[RunResult, str]) -> None:
        nonlocal device
        corpus, seed, spec = job
        result, device = outcome
        results[(str(corpus), seed, spec)] = result
        print(
            f"-- done {len(results)}/{len(jobs)}: {display_path(corpus)} seed {seed} {spec.label}: "
            f"val loss {result.last('loss/val'):.4f}",
            flush=True,
        )
        write_report(results, args, device, command, plot_curves=False)

    if args.report_only:
        for corpus, seed, spec in jobs:
            cached = cached_result(corpus_args(args, corpus, seed), spec)
            if cached is not None:
                results[(str(corpus), seed, spec)], device = cached
        return results, device
    if args.jobs == 1:
        for job in jobs:
            finished(job, run_one(corpus_args(args, job[0], job[1]), job[2]))
        return results, device
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {
            pool.submit(run_one, corpus_args(args, corpus, seed), spec): (corpus, seed, spec)
            for corpus, seed, spec in jobs
        }
        for future in concurrent.futures.as_completed(futures):
            try:
                outcome = future.result()
            except Exception:  # one failed run must not lose the others: report it and go on
                print(f"-- FAILED {futures[future]}:\n{traceback.format_exc()}", flush=True)
                continue
            finished(futures[future], outcome)
    return results, device


@dataclass
class Summary:
    """One variant on one corpus over the seeds."""

    runs: list[RunResult]

    def values(self, tag: str) -> list[float]:
        return [run.last(tag) for run in self.runs]

    @property
    def loss(self) -> float:
        return statistics.mean(self.values("loss/val"))

    @property
    def spread(self) -> float:
        """Half the range of the final validation loss over seeds."""
        losses = self.values("loss/val")
        return (max(losses) - min(losses)) / 2

    def layer_mean(self, group: str, kind: str) -> float | None:
        """``<group>/<...>.<kind>`` averaged over blocks and seeds; from the monitor's scalars or the extras."""
        pattern = re.compile(rf"{re.escape(group)}/.*\.{kind}$")
        values = [points[-1][1] for run in self.runs for tag, points in run.scalars.items() if pattern.match(tag)]
        values += [value for run in self.runs for tag, value in run.extras.items() if pattern.match(tag)]
        return statistics.mean(values) if values else None


def summaries(results: Results, corpus: str) -> dict[RunSpec, Summary]:
    by_spec: dict[RunSpec, list[RunResult]] = {}
    for (run_corpus, _, spec), result in sorted(results.items(), key=lambda item: item[0][1]):
        if run_corpus == corpus:
            by_spec.setdefault(spec, []).append(result)
    return {spec: Summary(runs) for spec, runs in by_spec.items()}


def usage_cell(summary: Summary, kind: str) -> str:
    values = [summary.layer_mean(layer_usage_tag(metric, "").rstrip("/"), kind) for metric in USAGE]
    return "—" if None in values else " / ".join(f"{value:.2f}" for value in values)


def input_cell(summary: Summary) -> str:
    values = [summary.layer_mean(statistic, kind) for statistic in INPUT_STATISTICS for kind in LAYER_KINDS]
    if None in values:
        return "—"
    bias, correlation = values[:3], values[3:]
    return " / ".join(f"{value:.2f}" for value in bias) + " ; " + " / ".join(f"{value:.2f}" for value in correlation)


def run_table(stats: dict[RunSpec, Summary]) -> list[str]:
    rows = [
        "| ablation | value | seeds | val loss (mean ± half range) | val bpb | train tokens/s | Q/K/V used / H / Gini "
        "| FFN in used / H / Gini | FFN out used / H / Gini | sign bias qkv / in / out ; bit corr. qkv / in / out |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ablation in ABLATIONS:
        for value, spec in ablation.variants:
            if spec not in stats:
                rows.append(f"| {ablation.name} | {value} | 0 | not run | | | | | | |")
                continue
            summary = stats[spec]
            speed = statistics.median(run.tokens_per_second() for run in summary.runs)
            rows.append(
                f"| {ablation.name} | {value} | {len(summary.runs)} | {summary.loss:.4f} ± {summary.spread:.4f} "
                f"| {statistics.mean(summary.values('val/bpb')):.4f} | {speed:,.0f} "
                + "".join(f"| {usage_cell(summary, kind)} " for kind in LAYER_KINDS)
                + f"| {input_cell(summary)} |"
            )
    return rows


def gap_and_noise(worse: Summary, better: Summary) -> tuple[float, float, str]:
    """``worse``'s mean loss minus ``better``'s, the sum of their seed spreads, and how the two compare."""
    gap, noise = worse.loss - better.loss, worse.spread + better.spread
    if min(len(worse.runs), len(better.runs)) < 2:
        return gap, noise, "one seed, no spread to judge by"
    return gap, noise, f"{'beyond' if abs(gap) > noise else 'within'} the seed spread {noise:.4f}"


def paper_claim(worse: Summary, better: Summary) -> str:
    """Does the paper's claim "``better`` has the lower loss" hold here, given the seed spread?"""
    gap, noise, judged = gap_and_noise(worse, better)
    resolved = abs(gap) > noise
    return f"{'holds' if gap > 0 else 'reversed'}{'' if resolved else ', not resolved'} ({gap:+.4f}, {judged})"


def against(reference: Summary, variant: Summary) -> str:
    """The variant's loss against the reference's, given the seed spread."""
    gap, _, judged = gap_and_noise(reference, variant)
    return f"{'lower' if gap > 0 else 'higher'} loss by {abs(gap):.4f} ({judged})"


def verdicts(stats: dict[RunSpec, Summary]) -> list[str]:
    """Per ablation: each of the paper's claims, or each variant against the paper's model."""
    lines = []
    for ablation in ABLATIONS:
        spec_of = dict(ablation.variants)
        if not all(spec in stats for spec in spec_of.values()):
            lines.append(f"- **{ablation.name}**: not every variant ran, no verdict.")
            continue
        if ablation.paper_pairs:
            claims = "; ".join(
                f"{better} better than {worse}: {paper_claim(stats[spec_of[worse]], stats[spec_of[better]])}"
                for worse, better in ablation.paper_pairs
            )
            lines.append(f"- **{ablation.name}** (paper: {ablation.paper_figures}): {claims}.")
        else:
            reference = ablation.variants[0]
            claims = "; ".join(
                f"{value}: {against(stats[reference[1]], stats[spec])} than {reference[0]}"
                for value, spec in ablation.variants[1:]
            )
            lines.append(f"- **{ablation.name}** (no claim in the paper): {claims}.")
    return lines


def collapse_over_time(results: Results, corpus: str, seed: int) -> list[str]:
    """The paper's model, one seed: each layer's used fraction and Gini in every monitor window."""
    run = results.get((corpus, seed, PAPER))
    if run is None:
        return []
    tags = sorted(tag for tag in run.scalars if tag.startswith(layer_usage_tag("used_fraction", "")))
    if not tags:
        return []
    steps = [step for step, _ in run.scalars[tags[0]]]
    rows = [
        f"| layer (used fraction / Gini at step) | {' | '.join(str(step) for step in steps)} |",
        "|---|" + "---|" * len(steps),
    ]
    for tag in tags:
        layer = tag.split("/", 1)[1]
        gini = dict(run.scalars[layer_usage_tag("gini", layer)])
        cells = " | ".join(f"{value:.2f} / {gini[step]:.2f}" for step, value in run.scalars[tag])
        rows.append(f"| {layer} | {cells} |")
    return rows


def plot(results: Results, args: argparse.Namespace, path: Path) -> None:
    """Validation loss against tokens: one panel per ablation and corpus, mean over seeds, min-max shaded."""
    figure = Figure(figsize=(3.2 * len(ABLATIONS), 3.0 * len(args.corpora)))
    FigureCanvasAgg(figure)
    axes_grid = figure.subplots(len(args.corpora), len(ABLATIONS), squeeze=False)
    for row, corpus in enumerate(args.corpora):
        stats = summaries(results, str(corpus))
        for column, ablation in enumerate(ABLATIONS):
            axes = axes_grid[row][column]
            for index, (value, spec) in enumerate(ablation.variants):
                if spec not in stats:
                    continue
                curves = [run.scalars["loss/val"] for run in stats[spec].runs]
                tokens = [(step + 1) * tokens_per_step(args) for step, _ in curves[0]]
                values = list(zip(*[[loss for _, loss in curve] for curve in curves]))
                axes.plot(tokens, [statistics.mean(point) for point in values], color=f"C{index}", label=value)
                axes.fill_between(
                    tokens, [min(p) for p in values], [max(p) for p in values], color=f"C{index}", alpha=0.2
                )
            axes.set_title(f"{ablation.name}\n{display_path(corpus)}", fontsize=9)
            axes.set_xlabel("training tokens", fontsize=8)
            axes.set_ylabel("val loss", fontsize=8)
            axes.tick_params(labelsize=7)
            axes.grid(alpha=0.3)
            axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def report(results: Results, args: argparse.Namespace, device: str, command: str, png: str) -> str:
    total = len(args.corpora) * len(args.seeds) * len(unique_specs())
    lines = [
        "# The paper's ablations and bucket-collapse remedies at small scale, equal tokens",
        "",
        f"- {environment(device)}; {args.jobs} runs in parallel; the machine was shared with other engineers' jobs, so "
        "every speed figure is noisy",
        f"- command: `{command}`",
        f"- runs: {len(results)} of {total} finished"
        + (
            ""
            if len(results) == total
            else " (PARTIAL RESULTS: `--report-only` rebuilt this report from the runs finished so far)"
        ),
        f"- every run: `configs/quickstart.yaml`, preset `{args.preset}`, overrides `{args.overrides}`, tokenizer "
        f"`{args.tokenizer}`, {args.steps} steps x {args.batch_size} windows x {args.seq_len} tokens = "
        f"{args.steps * tokens_per_step(args):,} training tokens, validation every {args.val_every} steps on the "
        f"same {args.val_batches * args.batch_size} held-out windows; seeds {', '.join(map(str, args.seeds))} "
        "(initialisation and training windows)",
        f"- usage columns: the BucketUsageMonitor's `memory_<metric>/<layer>` scalars of the last "
        f"{args.bucket_every}-step window (used fraction, normalised entropy H, Gini), averaged over blocks and "
        f"seeds. Sign bias and bit correlation: see the module docstring, on {STAT_BATCHES} validation batches "
        "after training. Spread: half the range of the final validation loss over seeds.",
        "",
    ]
    for corpus in args.corpora:
        stats = summaries(results, str(corpus))
        lines += [f"## {display_path(corpus)}", "", *run_table(stats), "", "Verdicts:", "", *verdicts(stats), ""]
        over_time = collapse_over_time(results, str(corpus), args.seeds[0])
        if over_time:
            lines += [f"Bucket usage of the paper's model over training (seed {args.seeds[0]}):", "", *over_time, ""]
    lines += [f"![validation curves]({png})", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = fit_parser(__doc__.split("\n\n")[0], REPO / "runs" / "ablations")
    parser.set_defaults(
        overrides="{n_layer: 2, n_embd: 80, n_head: 2, max_seq_len: 64}",
        steps=150,
        seq_len=64,
        val_every=25,
        val_batches=8,
        bucket_every=50,
    )
    parser.add_argument(
        "--corpora",
        nargs="+",
        default=[str(DEFAULT_CORPUS), "demo"],
        help="'demo' (the embedded corpus) or text files of documents separated by --document-separator lines",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="seeds of every variant")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the report and plot from the runs cached so far (partial results)",
    )
    args = parser.parse_args(argv)
    check_fit_args(parser, args)
    if args.bucket_every < 1:
        parser.error("--bucket-every must be positive: the study reports the bucket-usage monitor's figures")
    if args.jobs < 1 or len(args.seeds) < 1 or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--jobs must be >= 1 and --seeds distinct, got --jobs {args.jobs} --seeds {args.seeds}")
    args.corpora = [corpus_path(parser, text) for text in args.corpora]
    return args


def write_report(results: Results, args: argparse.Namespace, device: str, command: str, plot_curves: bool) -> Path:
    """``ablations_<device>.md`` (and, with ``plot_curves``, the PNG of validation curves) under ``--out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    kind = device_slug(device)
    png = args.out / f"ablations_{kind}_val.png"
    if plot_curves:
        plot(results, args, png)
    markdown = args.out / f"ablations_{kind}.md"
    markdown.write_text(report(results, args, device, command, png.name))
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "benchmarks/ablations.py", *(arg for arg in given if arg != "--report-only")])
    results, device = run_study(args, command)
    markdown = write_report(results, args, device, command, plot_curves=True)
    print(markdown.read_text())
    print(f"wrote {markdown} and its plot")


if __name__ == "__main__":
    main()
