"""The stages of ``mf doctor``, run in turn, and their markdown report with a one-line verdict.

A stage that raises is reported with its error and fails the verdict, and the later stages still run: a
pasted report shows everything that could be measured. The verdict is FAIL when a stage failed, an
implementation disagreed with the reference, or a training loss was not finite.
"""

from __future__ import annotations

import datetime
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mf_lightning.doctor import agreement, decoding, machine, speed, training

STAGES = ("Environment", "Memory Layer backends against the reference", "Memory Layer against nn.Linear",
          "Training", "Decoding")  # fmt: skip


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> list[str]:
    """The lines of a markdown table (columns whose index is in ``right`` are right-aligned)."""
    rule = "|" + "".join("---:|" if index in right else "---|" for index in range(len(header)))
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


@dataclass
class Report:
    """What the stages found: markdown sections, failures, and the headline figures of the verdict."""

    device: torch.device
    quick: bool
    sections: list[list[str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def verdict(self) -> str:
        """One line: PASS or FAIL, the device, and what decided it."""
        name = machine.device_name(self.device)
        if self.failures:
            return f"mf doctor: FAIL on {name}: " + "; ".join(self.failures)
        return f"mf doctor: PASS on {name}: " + "; ".join(self.headline)


def environment_stage(report: Report) -> list[str]:
    return markdown_table(["item", "value"], machine.environment_rows(report.device))


def agreement_stage(report: Report) -> list[str]:
    cases, notes = agreement.check_all(report.device, report.quick)
    wrong = [case for case in cases if not case.agreement.agrees]
    for case in wrong[:3]:
        report.failures.append(f"{case.implementation} {case.dtype} {case.skew}: {case.agreement.describe()}")
    if len(wrong) > 3:
        report.failures.append(f"{len(wrong) - 3} more disagreeing cases")
    report.headline.append(f"{len(cases) - len(wrong)} of {len(cases)} kernel checks agree with the reference")
    header = ["implementation", "dtype", "tokens x tables x bits -> width", "inputs", "output", "buckets",
              "grad x", "grad tables", "grad bias", "result"]  # fmt: skip
    return [
        "Errors are the largest difference from the float32 reference over the reference's largest magnitude "
        "(buckets: the fraction that differ); the tolerance is 4 unit roundoffs times the square root of the "
        "longest sum.",
        "",
        *markdown_table(header, agreement.table_rows(cases), right=range(4, 9)),
        *([""] + [f"- {note}" for note in notes] if notes else []),
    ]


def speed_stage(report: Report) -> list[str]:
    bandwidth, timings, settings = speed.measure(report.device, report.quick)
    rows = speed.table_rows(timings, bandwidth)
    fastest = min((t for t in timings if t.implementation != "nn.Linear" and t.preset == timings[-1].preset),
                  key=lambda t: t.forward_s)  # fmt: skip
    share = fastest.forward_bytes / fastest.forward_s / bandwidth
    report.headline.append(f"{fastest.preset}-width {fastest.implementation} forward at {share:.0%} of copy bandwidth")
    header = ["preset", "width", "implementation", "fwd ms", "fwd GB/s", "% copy", "fwd / Linear", "fwd+bwd ms",
              "fwd+bwd / Linear"]  # fmt: skip
    dtype = str(settings.dtype).removeprefix("torch.")
    return [
        f"{dtype}, {settings.tokens} tokens, layers width -> width with code_bits {speed.CODE_BITS}; copy bandwidth "
        f"measured {bandwidth / 1e9:.1f} GB/s (read + write of {settings.copy_bytes / 2**20:.0f} MiB); fwd GB/s: "
        "(rows gathered + input + output) bytes / time, for nn.Linear (weight + input + output); above 100% of "
        "the copy, the bytes came from a cache.",
        "",
        *markdown_table(header, rows, right=(1, 3, 4, 5, 6, 7, 8)),
    ]


def training_stage(report: Report) -> list[str]:
    results, settings = training.train_both(report.device, report.quick)
    for result in results:
        if not result.finite:
            report.failures.append(
                f"{result.arch} training loss not finite ({result.first_loss} -> {result.last_loss})"
            )
    ratio = results[0].tokens_per_second / results[1].tokens_per_second
    report.headline.append(f"{results[0].arch} trains {results[0].tokens_per_second:,.0f} tokens/s "
                           f"({ratio:.2f}x the {results[1].arch})")  # fmt: skip
    precision = "bf16 autocast" if report.device.type == "cuda" else "float32"
    header = ["model", "preset", "micro-batch", "steps", "tokens/s", "peak memory", "loss first -> last"]
    return [
        f"AdamW on random tokens, {precision}, Memory Layer backend auto; tokens/s over the steps after the "
        f"first {settings.warmup}.",
        "",
        *markdown_table(header, training.table_rows(results, settings), right=(3, 4)),
    ]


def decoding_stage(report: Report) -> list[str]:
    preset = training.plan(report.device, report.quick).preset
    results, new_tokens, compiled = decoding.decode_both(report.device, preset, report.quick)
    step = "compiled" if compiled else "eager (--quick)"
    report.headline.append(f"decodes {results[0].tokens_per_second:,.0f} tokens/s with the {step} step")
    rows = [[r.arch, preset, step, f"{r.tokens_per_second:,.1f}", f"{r.compile_seconds:.1f}"] for r in results]
    return [
        f"Batch 1, greedy, {new_tokens} new tokens after {decoding.PROMPT_LEN}; tokens/s of a warm run after the "
        "first new token; first-run extra: the first run's seconds over a warm run's (compilation).",
        "",
        *markdown_table(["model", "preset", "step", "tokens/s", "first-run extra s"], rows, right=(3, 4)),
    ]


STAGE_FUNCTIONS: tuple[Callable[[Report], list[str]], ...] = (
    environment_stage, agreement_stage, speed_stage, training_stage, decoding_stage,
)  # fmt: skip


def run(device: torch.device, quick: bool, progress: Callable[[str], None]) -> Report:
    """Every stage in turn, a progress line before and after each; a stage's error fails the verdict."""
    report = Report(device, quick)
    for index, (title, function) in enumerate(zip(STAGES, STAGE_FUNCTIONS), start=1):
        progress(f"mf doctor: [{index}/{len(STAGES)}] {title} ...")
        started = time.perf_counter()
        try:
            lines = function(report)
        except Exception as error:
            report.failures.append(f"{title} failed: {type(error).__name__}: {error}")
            lines = ["**FAILED**:", "", "```", *traceback.format_exception(error)[-6:], "```"]
        seconds = time.perf_counter() - started
        report.sections.append([f"## {title}", "", *lines, "", f"({seconds:.1f} s)"])
        progress(f"mf doctor: [{index}/{len(STAGES)}] {title}: {seconds:.1f} s")
    return report


def render(report: Report, argv: Sequence[str], seconds: float) -> str:
    """The report as markdown: title, verdict, command, then each stage's section."""
    lines = [
        f"# mf doctor: {machine.device_name(report.device)}",
        "",
        f"**{'PASS' if report.passed else 'FAIL'}** — {report.verdict().split(': ', 2)[2]}",
        "",
        f"- command: `mf doctor {shlex.join(argv)}`" + (" (quick: fewer shapes and steps)" if report.quick else ""),
        f"- date {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}; took {seconds:.0f} s",
        "",
    ]
    for section in report.sections:
        lines += [*section, ""]
    return "\n".join(lines)


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
