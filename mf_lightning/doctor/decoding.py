"""Batch-1 greedy decoding through the compiled fixed-shape step (what ``mf generate`` runs): tokens/s.

:func:`decode_run` times one decoding run by the wall clock and by the process's CPU time;
``benchmarks/decode.py`` measures with it too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mf_lightning.config import ARCHS, ModelConfig
from mf_lightning.doctor.timing import synchronize
from mf_lightning.models.architectures import build_model
from mf_lightning.models.base import DecoderLM
from mf_lightning.models.generation import stream

CLOCKS = ("wall", "cpu")
PROMPT_LEN = 8
WARM_RUNS = 2
"""Runs after the first, the fastest counted: dynamo may compile again on the second run (the KV cache's
second shape), and a shared machine's load comes and goes."""


def clocks() -> dict[str, float]:
    """Now, by the wall clock and by this process's CPU time (all its threads)."""
    return {"wall": time.perf_counter(), "cpu": time.process_time()}


def decode_run(model: DecoderLM, prompt: torch.Tensor, new_tokens: int, compile: bool) -> dict[str, dict[str, float]]:
    """Greedy decoding of ``new_tokens`` after ``prompt`` through ``stream`` (what ``generate`` runs), timed per
    clock: ``first``, seconds to the first new token (the prompt's prefill), and ``steps``, seconds from it to
    the last (the ``new_tokens - 1`` decoding steps, each one token through the KV cache)."""
    device = prompt.device
    synchronize(device)
    marks = [clocks()]
    for _ in stream(model, prompt, new_tokens, temperature=0, compile=compile):
        synchronize(device)
        marks.append(clocks())
    first, last = marks[1], marks[-1]
    return {
        "first": {clock: first[clock] - marks[0][clock] for clock in CLOCKS},
        "steps": {clock: last[clock] - first[clock] for clock in CLOCKS},
    }


@dataclass(frozen=True)
class Decoded:
    """One architecture's decoding: warm tokens/s and the first (compiling) run's extra seconds."""

    arch: str
    tokens_per_second: float
    compile_seconds: float


def decode_both(device: torch.device, preset: str, quick: bool) -> tuple[list[Decoded], int, bool]:
    """Both architectures of ``preset``: a first run (it compiles the step) and the fastest warm one; returns the
    results, the new tokens of a run and whether the step was compiled (not with ``quick``: eager)."""
    new_tokens, compile = (8, False) if quick else (32, True)
    results = []
    for arch in ARCHS:
        torch.manual_seed(0)
        config = ModelConfig.from_preset(preset, arch=arch, max_seq_len=PROMPT_LEN + new_tokens)
        model = build_model(config).to(device).eval()
        prompt = torch.randint(0, config.vocab_size, (1, PROMPT_LEN), device=device)
        first = decode_run(model, prompt, new_tokens, compile)
        warm = min((decode_run(model, prompt, new_tokens, compile) for _ in range(WARM_RUNS)),
                   key=lambda run: run["steps"]["wall"])  # fmt: skip
        extra = sum(first[part]["wall"] - warm[part]["wall"] for part in first)
        results.append(Decoded(arch, (new_tokens - 1) / warm["steps"]["wall"], extra))
    return results, new_tokens, compile
