"""Batch-1 greedy decoding speed, MemoryFormer against the Transformer of the same width and depth,
beside the ratio of the bytes each model reads per token (the speed ratio a bandwidth-bound decoder reaches).

    python benchmarks/decode.py [--presets debug tiny small base] [--dtypes float32 bfloat16]
                                [--threads 1 2] [--new-tokens 64] [--repeats 3] [--profile] [--note TEXT]

Each model generates ``--new-tokens`` tokens after an 8-token prompt with the KV cache, in eval mode;
tokens/s is from the fastest of ``--repeats`` runs (the least disturbed by other work on the machine)
after one warm-up run, at each ``--threads`` setting (default: 1 and all cores). Models are built on
the meta device and materialised directly in the measured dtype (random weights: speed does not
depend on them), one at a time, the largest last; a model whose weights would not fit in the memory
available right now is skipped with a note (MemoryFormer-base is 13.3 GB in bfloat16, 26.6 GB in float32).

Bytes per token are what one decoding step must read: the rows a Memory Layer gathers (``K`` of
each table) and all weights of a linear layer, the LM head, one embedding row, norms and biases, and
the KV cache at the mean position of the run. Decoding at batch 1 is bandwidth-bound, so the
Transformer/MemoryFormer byte ratio is the speed ratio a perfect implementation of both reaches;
"of bytes" is how much of it was measured. ``--profile`` adds, per model, the operators with the most
CPU time over one run. Prints markdown and writes it to ``benchmarks/results/decode_<device>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mf_lightning.config import PRESETS, ModelConfig
from mf_lightning.models import DecoderLM
from mf_lightning.models.pretrained import build_in_dtype
from mf_lightning.nn import MemoryLayer

PROMPT_LEN = 8
RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ARCHS = ("memoryformer", "transformer")
MEMORY_HEADROOM = 0.85
"""Fraction of the currently available memory a model's weights may take."""


def bytes_per_token(model: DecoderLM, cached_positions: float) -> float:
    """Bytes one decoding step reads: weights it uses (only the gathered rows of Memory Layer tables
    and one row of an untied embedding) plus keys and values of ``cached_positions`` earlier tokens."""
    config = model.config
    total = 0.0
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            size = parameter.element_size()
            if isinstance(module, MemoryLayer) and name == "tables":
                total += module.num_tables * module.out_features * size
            elif isinstance(module, nn.Embedding) and model.head is not None:
                total += parameter.shape[1] * size
            else:
                total += parameter.numel() * size
    kv_bytes = 2 * config.n_layer * config.n_embd * next(model.parameters()).element_size()
    return total + kv_bytes * cached_positions


def weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of all weights of the model of ``config`` in ``dtype``, counted on the meta device."""
    with torch.device("meta"):
        model = build_in_dtype(config, "meta", dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (``MemAvailable``), or unlimited where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return sys.maxsize


def tokens_per_second(model: DecoderLM, new_tokens: int, repeats: int) -> float:
    """Generated tokens per second of batch-1 greedy decoding, best of ``repeats`` timed runs."""
    device = next(model.parameters()).device
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN), device=device)
    model.generate(prompt, new_tokens, temperature=0)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        model.generate(prompt, new_tokens, temperature=0)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def top_operators(model: DecoderLM, new_tokens: int, rows: int = 10) -> str:
    """The ``rows`` operators with the most self CPU time in one decoding run, as a text table."""
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN), device=next(model.parameters()).device)
    with torch.profiler.profile() as profile:
        model.generate(prompt, new_tokens, temperature=0)
    return profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def measure(
    preset: str, dtype_name: str, arch: str, device: torch.device, threads: Sequence[int], args: argparse.Namespace
) -> tuple[dict[int, float] | str, float | None, list[str]]:
    """Tokens/s per thread count (or why the model was skipped), bytes per token, profile lines."""
    dtype = DTYPES[dtype_name]
    config = ModelConfig.from_preset(preset, arch=arch, max_seq_len=PROMPT_LEN + args.new_tokens)
    needed, free = weight_bytes(config, dtype), available_memory()
    if needed > MEMORY_HEADROOM * free:
        return f"skipped: {needed / 1e9:.1f} GB of weights, {free / 1e9:.1f} GB available", None, []
    model = build_in_dtype(config, device, dtype).eval()
    speeds, profile = {}, []
    for count in threads:
        torch.set_num_threads(count)
        speeds[count] = tokens_per_second(model, args.new_tokens, args.repeats)
        print(f"{preset} {dtype_name} {arch} {count} threads: {speeds[count]:.1f} tok/s", file=sys.stderr, flush=True)
    if args.profile:
        torch.set_num_threads(threads[0])
        profile = [f"## {preset} {dtype_name} {arch}, {threads[0]} threads", "", "```",
                   top_operators(model, args.new_tokens), "```", ""]
    used = bytes_per_token(model, PROMPT_LEN + (args.new_tokens - 1) / 2)
    del model
    gc.collect()
    return speeds, used, profile


def benchmark(args: argparse.Namespace, device: torch.device) -> tuple[list[str], list[str]]:
    """Markdown rows (per preset, dtype and thread count) and profiles."""
    rows = [
        "| preset | dtype | threads | MF MB/token | TF MB/token | bytes TF/MF | MF tok/s | TF tok/s "
        "| speed MF/TF | speed / bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    profiles = []
    for preset in args.presets:
        for dtype_name in args.dtypes:
            results = {}
            for arch in ARCHS:
                results[arch] = measure(preset, dtype_name, arch, device, args.threads, args)
                profiles += results[arch][2]
            rows += table_rows(preset, dtype_name, args.threads, results)
    return rows, profiles


def table_rows(
    preset: str, dtype_name: str, threads: Sequence[int], results: dict[str, tuple[dict[int, float] | str, float | None, list[str]]]
) -> list[str]:
    """One markdown row per thread count; a skipped model shows why."""
    (mf_speeds, mf_bytes, _), (tf_speeds, tf_bytes, _) = results["memoryformer"], results["transformer"]
    rows = []
    for count in threads:
        cells = [preset, dtype_name, str(count)]
        cells += [f"{b / 1e6:.2f}" if b is not None else "-" for b in (mf_bytes, tf_bytes)]
        bytes_ratio = tf_bytes / mf_bytes if mf_bytes and tf_bytes else None
        cells.append(f"{bytes_ratio:.2f}" if bytes_ratio else "-")
        speeds = [s[count] if isinstance(s, dict) else None for s in (mf_speeds, tf_speeds)]
        cells += [f"{s:.1f}" if s is not None else str(r) for s, r in zip(speeds, (mf_speeds, tf_speeds))]
        if None in speeds or not bytes_ratio:
            cells += ["-", "-"]
        else:
            speed_ratio = speeds[0] / speeds[1]
            cells += [f"{speed_ratio:.2f}", f"{100 * speed_ratio / bytes_ratio:.0f}%"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (default 3)")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
        help="torch intra-op thread counts to measure (default: 1 and all cores)",
    )
    parser.add_argument("--profile", action="store_true", help="also list the most expensive operators")
    parser.add_argument("--note", default="", help="free text for the report, e.g. the machine's load")
    args = parser.parse_args(argv)
    if min(args.new_tokens, args.repeats, *args.threads) < 1:
        parser.error(
            f"--new-tokens, --repeats and --threads must be positive, got {args.new_tokens}, {args.repeats}, "
            f"{args.threads}"
        )
    device = torch.device(args.device)
    header = [
        f"# Batch-1 greedy decoding, {args.new_tokens} new tokens after {PROMPT_LEN}, KV cache",
        "",
        f"device: {device_name(device)}; torch {torch.__version__}; date: {datetime.date.today().isoformat()}; "
        f"best of {args.repeats} runs; load average before the run: {os.getloadavg()[0]:.1f}",
        "",
        f"command: `python benchmarks/decode.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        *([args.note, ""] if args.note else []),
    ]
    rows, profiles = benchmark(args, device)
    report = "\n".join([*header, *rows, "", *profiles])
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"decode_{device.type}.md").write_text(report)


if __name__ == "__main__":
    main()
