"""Batch-1 greedy decoding speed, MemoryFormer against the Transformer of the same width and depth,
beside the ratio of the bytes each model reads per token (the speed ratio a bandwidth-bound decoder reaches).

    python benchmarks/decode.py [--presets debug tiny small base] [--dtypes float32 bfloat16]
                                [--threads 1 2] [--new-tokens 64] [--repeats 3] [--modes compiled eager]
                                [--prefill-len 512] [--profile] [--note TEXT]

Each model generates ``--new-tokens`` tokens after an 8-token prompt with the KV cache, in eval mode,
through the compiled fixed-shape step (``compiled``, the default of ``generate``) and eagerly
(``eager``, ``compile=False``). Both models of a preset and dtype are in memory together and are
measured interleaved (for each of ``--repeats`` rounds: each thread count, mode and model in turn), so
both see the same load of a shared machine and their ratio is what counts. Tokens/s is the decoding speed
(the inverse of the time per output token): the ``--new-tokens - 1`` tokens after the first, over the time
from the first new token to the last, in the fastest round; the first token waits for the prompt's
prefill, which reads a Memory Layer's rows once per prompt token, and is reported on its own (first-token
milliseconds). The byte ratio is that of one decoding step. Compile time is the first call's time minus a
warm call's, with dynamo's in-process caches
emptied before each pair (inductor's on-disk cache stays as the machine has it); the step is then
cached for the process. Prefill is the CPU time of the prompt's forward pass (``--prefill-len``
tokens, logits of the last position only, as decoding now does) against the forward pass that also
computes the LM head on every prompt position (what decoding did before), at the first ``--threads``
count, the two in alternating order. The machine's load average (``os.getloadavg``) is printed before
and after each preset and dtype.

Speeds are given twice: by the wall clock, and per second of the process's CPU time (``tok/CPU-s``).
On a machine shared with other work, a single-threaded run's CPU time leaves out the time it waited
for a core, so at 1 thread it is the better estimate of the unloaded speed (both models still share
the memory bandwidth with the other work); with several threads it sums them and measures work, not speed.

Models are built on the meta device and materialised directly in the measured dtype (random weights:
speed does not depend on them); where the weights of both would not fit in
the memory available right now, they are measured at the greatest depth at which both fit (the same for both,
and the row says so: MemoryFormer-base is 13.3 GB in bfloat16, 26.6 GB in float32), or skipped with a
note where not even one block fits.

Bytes per token are what one decoding step must read: the rows a Memory Layer gathers (``K`` of
each table) and all weights of a linear layer, the LM head, one embedding row, norms and biases, and
the KV cache at the mean position of the run. Decoding at batch 1 is bandwidth-bound, so the
Transformer/MemoryFormer byte ratio is the speed ratio a perfect implementation of both reaches;
"of bytes" is how much of it was measured. ``--profile`` adds, per model, the operators with the most
CPU time over one compiled run. Prints markdown and writes it to ``benchmarks/results/decode_<device>.md``.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from harness import device_slug, environment, synchronize, write_result
from torch import nn

from mf_lightning.config import PRESETS, ModelConfig
from mf_lightning.doctor.decoding import CLOCKS, PROMPT_LEN, decode_run
from mf_lightning.models import DecoderLM
from mf_lightning.models.pretrained import build_in_dtype
from mf_lightning.nn import MemoryLayer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ARCHS = ("memoryformer", "transformer")
MODES = {"compiled": True, "eager": False}
PREFILL_CLOCK = "cpu"
"""Prefill is timed at the first ``--threads`` count (1 by default) by CPU time, in alternating order."""
MEMORY_HEADROOM = 0.85
"""Fraction of the currently available memory the weights may take."""


@dataclass
class Measured:
    """What was measured of one model: best seconds of the decoding steps and of the first token per (threads,
    mode, clock), compile and prefill seconds."""

    decode: dict[tuple[int, str, str], float] = field(default_factory=dict)
    first_token: dict[tuple[int, str, str], float] = field(default_factory=dict)
    compile_seconds: float | None = None
    prefill: dict[str, float] = field(default_factory=dict)
    bytes_per_token: float = 0.0

    def keep_best(self, table: dict, key: object, seconds: float) -> None:
        table[key] = min(table.get(key, float("inf")), seconds)


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


def fitting_configs(preset: str, dtype: torch.dtype, max_len: int, budget: float) -> dict[str, ModelConfig | None]:
    """Both models of ``preset`` at its depth, or at the greatest depth whose weights both fit in ``budget``
    bytes together (the same depth for both, so their ratio compares like with like); None where even one
    block does not fit beside the other model."""
    full = ModelConfig.from_preset(preset).n_layer
    for layers in range(full, 0, -1):
        configs = {
            arch: ModelConfig.from_preset(preset, arch=arch, max_seq_len=max_len, n_layer=layers) for arch in ARCHS
        }
        if sum(weight_bytes(config, dtype) for config in configs.values()) <= budget:
            return configs
    return dict.fromkeys(ARCHS)


def preset_label(preset: str, configs: dict[str, ModelConfig | None]) -> str:
    """``preset``, with the depth measured where it is not the preset's own (the models were cut to fit)."""
    depth, full = configs["memoryformer"], ModelConfig.from_preset(preset).n_layer
    return preset if depth is None or depth.n_layer == full else f"{preset} ({depth.n_layer} of {full} layers)"


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (``MemAvailable``), or unlimited where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return sys.maxsize


def timed(function, device: torch.device) -> dict[str, float]:
    """Seconds one call of ``function`` takes: ``wall`` clock and ``cpu`` time of this process (all its threads)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    synchronize(device)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def top_operators(model: DecoderLM, new_tokens: int, rows: int = 10) -> str:
    """The ``rows`` operators with the most self CPU time in one compiled decoding run, as a text table."""
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN), device=next(model.parameters()).device)
    with torch.profiler.profile() as profile:
        decode_run(model, prompt, new_tokens, compile=True)
    return profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


@torch.no_grad()
def prefill_run(model: DecoderLM, prompt: torch.Tensor, all_positions: bool) -> None:
    """The prompt's forward pass with a KV cache: the LM head on the last position (now) or on all (before)."""
    caches = model.new_kv_caches(prompt.shape[1] + 1)
    if all_positions:
        model.compute_logits(prompt, caches)[:, -1]
    else:
        torch.nn.functional.linear(model.hidden_states(prompt, caches)[:, -1], model.head_weight)


def measure_pair(
    preset: str, dtype_name: str, device: torch.device, args: argparse.Namespace
) -> tuple[str, dict[str, Measured | str], list[str]]:
    """Both models of ``preset`` in ``dtype_name``, measured interleaved (or why a model was skipped), and profiles;
    first the preset's label, which names the depth where the models were cut to fit in memory."""
    dtype = DTYPES[dtype_name]
    torch.compiler.reset()  # a fresh compile budget per pair: dynamo stops compiling a function after 8 variants
    max_len = max(PROMPT_LEN + args.new_tokens, args.prefill_len + 1)
    free = available_memory()
    configs = fitting_configs(preset, dtype, max_len, MEMORY_HEADROOM * free)
    results: dict[str, Measured | str] = {}
    models: dict[str, DecoderLM] = {}
    for arch, config in configs.items():
        if config is None:
            needed = weight_bytes(ModelConfig.from_preset(preset, arch=arch), dtype)
            results[arch] = f"skipped: {needed / 1e9:.1f} GB of weights, {free / 1e9:.1f} GB available"
            continue
        models[arch] = build_in_dtype(config, device, dtype).eval()
        results[arch] = Measured(bytes_per_token=bytes_per_token(models[arch], PROMPT_LEN + (args.new_tokens - 1) / 2))
    prompts = {arch: torch.randint(0, configs[arch].vocab_size, (1, PROMPT_LEN), device=device) for arch in models}
    long_prompts = {
        arch: torch.randint(0, configs[arch].vocab_size, (1, args.prefill_len), device=device) for arch in models
    }
    torch.set_num_threads(args.threads[0])
    for arch, model in models.items():
        if "compiled" in args.modes:
            first = decode_run(model, prompts[arch], args.new_tokens, True)
            warm = decode_run(model, prompts[arch], args.new_tokens, True)
            results[arch].compile_seconds = sum(first[part]["wall"] - warm[part]["wall"] for part in first)
        if "eager" in args.modes:
            decode_run(model, prompts[arch], args.new_tokens, False)
    for round_ in range(args.repeats):
        for count in args.threads:
            torch.set_num_threads(count)
            for mode in args.modes:
                for arch, model in models.items():
                    seconds = decode_run(model, prompts[arch], args.new_tokens, MODES[mode])
                    for clock in CLOCKS:
                        results[arch].keep_best(results[arch].decode, (count, mode, clock), seconds["steps"][clock])
                        results[arch].keep_best(
                            results[arch].first_token, (count, mode, clock), seconds["first"][clock]
                        )
            if count == args.threads[0]:
                order = (("now", False), ("before", True))
                for arch, model in models.items():
                    for label, all_positions in order[:: 1 if round_ % 2 else -1]:
                        seconds = timed(lambda: prefill_run(model, long_prompts[arch], all_positions), device)  # noqa: B023
                        results[arch].keep_best(results[arch].prefill, label, seconds[PREFILL_CLOCK])
        print(
            f"{preset} {dtype_name}: round {round_ + 1}/{args.repeats} done, load {os.getloadavg()[0]:.1f}",
            file=sys.stderr,
            flush=True,
        )
    profiles = []
    label = preset_label(preset, configs)
    if args.profile:
        torch.set_num_threads(args.threads[0])
        for arch, model in models.items():
            profiles += [
                f"## {label} {dtype_name} {arch}, {args.threads[0]} threads, compiled",
                "",
                "```",
                top_operators(model, args.new_tokens),
                "```",
                "",
            ]
    models.clear()
    gc.collect()
    return label, results, profiles


def speed_rows(
    preset: str, dtype_name: str, args: argparse.Namespace, results: dict[str, Measured | str], load: str
) -> list[str]:
    """One markdown row per thread count and mode; a skipped model shows why."""
    mf, tf = results["memoryformer"], results["transformer"]
    mf_bytes = mf.bytes_per_token if isinstance(mf, Measured) else None
    tf_bytes = tf.bytes_per_token if isinstance(tf, Measured) else None
    bytes_ratio = tf_bytes / mf_bytes if mf_bytes and tf_bytes else None
    rows = []
    for count in args.threads:
        for mode in args.modes:
            cells = [preset, dtype_name, str(count), mode]
            cells += [f"{b / 1e6:.2f}" if b else "-" for b in (mf_bytes, tf_bytes)]
            cells.append(f"{bytes_ratio:.2f}" if bytes_ratio else "-")
            for clock in CLOCKS:
                speeds = [
                    (args.new_tokens - 1) / r.decode[count, mode, clock] if isinstance(r, Measured) else None
                    for r in (mf, tf)
                ]
                cells += [f"{speed:.1f}" if speed else str(r) for speed, r in zip(speeds, (mf, tf))]
                if None in speeds or not bytes_ratio:
                    cells += ["-", "-"]
                else:
                    ratio = speeds[0] / speeds[1]
                    cells += [f"{ratio:.2f}", f"**{100 * ratio / bytes_ratio:.0f}%**"]
            cells.append(load)
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def cost_row(preset: str, dtype_name: str, args: argparse.Namespace, results: dict[str, Measured | str]) -> str:
    """Compile seconds, first-token milliseconds and 512-token prefill seconds (now / before) of both models."""
    cells = [preset, dtype_name]
    for result in (results[arch] for arch in ARCHS):
        if not isinstance(result, Measured):
            cells += ["-", "-", "-", "-"]
            continue
        cells.append(f"{result.compile_seconds:.1f}" if result.compile_seconds is not None else "-")
        cells.append(f"{1e3 * result.first_token[args.threads[0], args.modes[0], 'wall']:.0f}")
        cells += [f"{result.prefill[label]:.3f}" for label in ("now", "before")]
    return "| " + " | ".join(cells) + " |"


def benchmark(args: argparse.Namespace, device: torch.device) -> tuple[list[str], list[str], list[str]]:
    """Markdown rows of decoding speed, of compile and prefill cost, and profiles."""
    speed = [
        "| preset | dtype | threads | step | MF MB/token | TF MB/token | bytes TF/MF | MF tok/s | TF tok/s "
        "| speed MF/TF | speed / bytes | MF tok/CPU-s | TF tok/CPU-s | MF/TF (CPU) | speed / bytes (CPU) "
        "| load before → after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cost = [
        "| preset | dtype | MF compile s | MF first token ms | MF prefill s now | MF prefill s before | TF compile s "
        "| TF first token ms | TF prefill s now | TF prefill s before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    profiles = []
    for preset in args.presets:
        for dtype_name in args.dtypes:
            before = os.getloadavg()[0]
            label, results, profile = measure_pair(preset, dtype_name, device, args)
            load = f"{before:.1f} → {os.getloadavg()[0]:.1f}"
            speed += speed_rows(label, dtype_name, args, results, load)
            cost.append(cost_row(label, dtype_name, args, results))
            profiles += profile
            print("\n".join(speed[-len(args.threads) * len(args.modes) :] + [cost[-1]]), file=sys.stderr, flush=True)
    return speed, cost, profiles


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, os.cpu_count() or 1}),
        help="torch intra-op thread counts to measure (default: 1 and all cores)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="decoding step(s) to measure (default: compiled and eager)",
    )
    parser.add_argument(
        "--prefill-len", type=int, default=512, help="prompt length of the prefill timing (default 512)"
    )
    parser.add_argument("--profile", action="store_true", help="also list the most expensive operators")
    parser.add_argument("--note", default="", help="free text for the report")
    args = parser.parse_args(argv)
    if min(args.repeats, args.prefill_len, *args.threads) < 1 or args.new_tokens < 2:
        parser.error(
            f"--new-tokens must be at least 2 (speed is timed from the first new token to the last), --repeats, "
            f"--prefill-len and --threads positive; got {args.new_tokens}, {args.repeats}, {args.prefill_len}, "
            f"{args.threads}"
        )
    device = torch.device(args.device)
    header = [
        f"# Batch-1 greedy decoding, {args.new_tokens} new tokens after {PROMPT_LEN}, KV cache",
        "",
        f"{environment(device)} (at the start); CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        f"best of {args.repeats} interleaved rounds",
        "",
        f"command: `python benchmarks/decode.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        *([args.note, ""] if args.note else []),
    ]
    speed, cost, profiles = benchmark(args, device)
    cost_header = [
        f"Compile time in wall seconds (first call minus a warm call, {args.threads[0]} thread(s); then cached for "
        f"the process), the first new token after the {PROMPT_LEN}-token prompt in wall milliseconds "
        f"({args.threads[0]} thread(s), {args.modes[0]} step, best of the rounds) and the prefill of a {args.prefill_len}-token prompt in CPU seconds: now (LM head on the "
        "last position) and before (LM head on every position), best of the rounds, in alternating order:",
        "",
    ]
    report = "\n".join([*header, *speed, "", *cost_header, *cost, "", *profiles])
    write_result(f"decode_{device_slug(device)}.md", report)


if __name__ == "__main__":
    main()
