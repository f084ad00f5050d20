"""Batch-1 greedy decoding speed, MemoryFormer against the Transformer of the same width and depth.

    python benchmarks/decode.py [--presets debug tiny] [--device cpu] [--threads 1] [--new-tokens 64]
                                [--repeats 5] [--profile]

Each model generates ``--new-tokens`` tokens after an 8-token prompt with the KV cache, in eval mode;
tokens/s is from the fastest of ``--repeats`` runs (the least disturbed by other work on the machine)
after one warm-up run. ``--threads`` sets torch's intra-op threads (default 1: batch-1 decoding has
too little work per op to split, and on a busy machine extra threads mostly wait for each other).
``--profile`` adds, per model, the operators that took the most CPU time over one run. Prints
markdown and writes it to ``benchmarks/results/decode_<device>.md`` with the device, torch version,
thread count and date.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mf_lightning.config import PRESETS, ModelConfig
from mf_lightning.models import DecoderLM, build_model

PROMPT_LEN = 8
RESULTS = Path(__file__).resolve().parent / "results"


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


def top_operators(model: DecoderLM, new_tokens: int, rows: int = 8) -> str:
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
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def benchmark(
    presets: Sequence[str], device: torch.device, new_tokens: int, repeats: int, profile: bool
) -> tuple[list[str], list[str]]:
    """Markdown table rows (tokens/s of both architectures for every preset, and their ratio) and profiles."""
    profiles = []
    rows = [
        "| preset | layers | width | MemoryFormer tok/s | Transformer tok/s | MemoryFormer / Transformer |",
        "|---|---|---|---|---|---|",
    ]
    for preset in presets:
        speeds = {}
        for arch in ("memoryformer", "transformer"):
            config = ModelConfig.from_preset(preset, arch=arch, max_seq_len=PROMPT_LEN + new_tokens)
            with torch.device(device):
                model = build_model(config).eval()
            speeds[arch] = tokens_per_second(model, new_tokens, repeats)
            if profile:
                profiles += [f"## {preset} {arch}", "", "```", top_operators(model, new_tokens), "```", ""]
            del model
        rows.append(
            f"| {preset} | {config.n_layer} | {config.n_embd} | {speeds['memoryformer']:.1f} "
            f"| {speeds['transformer']:.1f} | {speeds['memoryformer'] / speeds['transformer']:.2f} |"
        )
    return rows, profiles


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=["debug", "tiny"])
    parser.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--profile", action="store_true", help="also list the most expensive operators")
    args = parser.parse_args(argv)
    if min(args.new_tokens, args.repeats, args.threads) < 1:
        parser.error(
            f"--new-tokens, --repeats and --threads must be positive, got {args.new_tokens}, {args.repeats}, "
            f"{args.threads}"
        )
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    header = [
        f"# Batch-1 greedy decoding, {args.new_tokens} new tokens after {PROMPT_LEN}, KV cache",
        "",
        f"device: {device_name(device)}; torch {torch.__version__}; "
        f"date: {datetime.date.today().isoformat()}; best of {args.repeats} runs",
        "",
    ]
    rows, profiles = benchmark(args.presets, device, args.new_tokens, args.repeats, args.profile)
    report = "\n".join([*header, *rows, "", *profiles])
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"decode_{device.type}.md").write_text(report)


if __name__ == "__main__":
    main()
