"""Peak memory and time of one training step's forward + backward with the plain and the chunked LM loss.

A 1-layer width-512 MemoryFormer with a 50304-token vocabulary runs forward and backward on 8 x 1024
tokens, once with ``loss_chunk_size=0`` (full ``[tokens, vocab]`` logits and ``F.cross_entropy``) and
once per chunk size (``mf_lightning.nn.chunked_loss``). Each measurement is a fresh subprocess: it builds
the model, allocates every parameter's gradient, then resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``) and reads the peak (``VmHWM``) after the step, so the figure is the step's
own extra memory beyond weights and gradients, as the operating system sees it (torch's CPU allocator
returns large blocks to it at once). The same step at a 256-token vocabulary gives the part that is not
the vocabulary's (the layer's activations); the difference is the vocabulary's extra memory, reported in
units of one fp32 ``[tokens, vocab]`` tensor. Step time is the median over ``--repeats`` steps after
one warm-up step, in that same process. Variants run alternately ``--rounds`` times (a shared machine's
load hits all alike); the table holds each variant's lowest memory and its median step time.

    python benchmarks/loss_memory.py [--rounds 2] [--repeats 2] [--chunks 0 512 1024]

Linux only (reads ``/proc``). Prints a markdown table and writes ``benchmarks/results/loss_memory_cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

import torch
from harness import environment, write_result

from mf_lightning.config import ModelConfig
from mf_lightning.models import build_model

VOCAB, CONTROL_VOCAB, WIDTH, BATCH, SEQ_LEN = 50304, 256, 512, 8, 1024
MIB = 2**20


def status_mib(field: str) -> float:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB."""
    match = re.search(rf"{field}:\s+(\d+) kB", pathlib.Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024


def measure(chunk_size: int, vocab: int, repeats: int) -> dict[str, float]:
    """Extra peak memory (MiB) of one forward + backward over the allocated weights and gradients, and step times."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        "tiny", n_layer=1, vocab_size=vocab, max_seq_len=SEQ_LEN, loss_chunk_size=chunk_size
    )
    model = build_model(config)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    idx = torch.randint(0, vocab, (BATCH, SEQ_LEN))
    targets = idx.roll(-1, dims=1)

    def step() -> float:
        start = time.perf_counter()
        model(idx, targets)[1].backward()
        return time.perf_counter() - start

    baseline = status_mib("VmRSS")
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    first = step()
    peak = status_mib("VmHWM")
    times = [step() for _ in range(repeats)] or [first]
    return {"extra_mib": peak - baseline, "step_s": statistics.median(times)}


def run_worker(chunk_size: int, vocab: int, repeats: int) -> dict[str, float]:
    """``measure`` in a fresh Python process, so earlier allocations cannot hide this one's peak."""
    command = [sys.executable, __file__, "--worker", str(chunk_size), str(vocab), "--repeats", str(repeats)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def label(chunk_size: int) -> str:
    return "plain (loss_chunk_size=0)" if chunk_size == 0 else f"chunked, loss_chunk_size={chunk_size}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=[512, 1024], help="chunk sizes (0, the plain path, is always run)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per process after the measured one")
    parser.add_argument("--worker", type=int, nargs=2, metavar=("CHUNK", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(*args.worker, args.repeats)))
        return

    chunks = sorted({0, *args.chunks})
    before = environment()
    runs: dict[tuple[int, int], list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for chunk_size, vocab in [(0, CONTROL_VOCAB), *((c, VOCAB) for c in chunks)]:
            runs.setdefault((chunk_size, vocab), []).append(run_worker(chunk_size, vocab, args.repeats))

    unit_mib = BATCH * SEQ_LEN * VOCAB * 4 / MIB
    control_mib = min(r["extra_mib"] for r in runs[(0, CONTROL_VOCAB)])
    plain_time = statistics.median(r["step_s"] for r in runs[(0, VOCAB)])
    lines = [
        "# Chunked LM loss: extra peak memory and time of one forward + backward",
        "",
        f"Before: {before}. After: load average {os.getloadavg()[0]:.1f} (a shared machine: other processes slow "
        "every step alike and add noise to the times). Command: `python benchmarks/loss_memory.py "
        f"--rounds {args.rounds} --repeats {args.repeats} --chunks {' '.join(map(str, chunks))}`.",
        "",
        f"Model: MemoryFormer, 1 layer, width {WIDTH}, vocabulary {VOCAB}; {BATCH} x {SEQ_LEN} tokens. "
        f"One fp32 [tokens, vocab] tensor = {unit_mib:.0f} MiB. Extra = peak RSS of the step minus the RSS with "
        f"weights and gradients allocated; the same model at a {CONTROL_VOCAB}-token vocabulary needs "
        f"{control_mib:.0f} MiB extra (the layer's activations), subtracted to give the vocabulary's share.",
        "",
        "| loss | step extra (MiB) | vocabulary's extra (MiB) | in fp32 [tokens, vocab] tensors "
        "| fwd+bwd time (s, median) | time vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for chunk_size in chunks:
        extra = min(r["extra_mib"] for r in runs[(chunk_size, VOCAB)])
        seconds = statistics.median(r["step_s"] for r in runs[(chunk_size, VOCAB)])
        lines.append(
            f"| {label(chunk_size)} | {extra:.0f} | {extra - control_mib:.0f} | {(extra - control_mib) / unit_mib:.2f} "
            f"| {seconds:.2f} | {seconds / plain_time - 1:+.1%} |"
        )
    write_result("loss_memory_cpu.md", "\n".join(lines))


if __name__ == "__main__":
    main()
