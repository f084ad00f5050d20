"""A short training of MemoryFormer and the Transformer on the device: tokens/s and peak memory.

Both architectures of one small preset (``tiny`` on a GPU in bfloat16 autocast, as ``mf fit`` trains
there; ``debug`` in float32 on a CPU) take the same optimizer steps of AdamW on random tokens, with the
Memory Layer backend ``auto`` picks. Tokens/s counts the steps after the warm-up ones (allocation,
autotuning, the triton check); the loss must stay finite.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass

import torch

from mf_lightning.config import ARCHS, ModelConfig
from mf_lightning.doctor.timing import synchronize
from mf_lightning.models.architectures import build_model


@dataclass(frozen=True)
class Plan:
    """The training stage on a device: preset, micro-batch, steps and warm-up steps."""

    preset: str
    batch_size: int
    seq_len: int
    steps: int
    warmup: int


def plan(device: torch.device, quick: bool) -> Plan:
    if device.type == "cuda":
        return Plan("tiny", 16, 1024, 8 if quick else 30, 3)
    return Plan("debug", 4 if quick else 8, 64 if quick else 128, 6 if quick else 30, 2 if quick else 5)


@dataclass(frozen=True)
class Trained:
    """One architecture's short training."""

    arch: str
    tokens_per_second: float
    peak_memory: str
    first_loss: float
    last_loss: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.first_loss) and math.isfinite(self.last_loss)


def train(arch: str, device: torch.device, settings: Plan) -> Trained:
    """``settings.steps`` AdamW steps of ``arch`` at ``settings.preset`` on random tokens."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset(settings.preset, arch=arch, max_seq_len=settings.seq_len)
    model = build_model(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, config.vocab_size, (settings.steps, settings.batch_size, settings.seq_len + 1))
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
    losses = []
    started = 0.0
    for step in range(settings.steps):
        if step == settings.warmup:
            synchronize(device)
            started = time.perf_counter()
        batch = tokens[step].to(device)
        with autocast:
            _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    synchronize(device)
    seconds = time.perf_counter() - started
    measured = (settings.steps - settings.warmup) * settings.batch_size * settings.seq_len
    if on_gpu:
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (GPU)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS so far)"
    return Trained(arch, measured / seconds, peak, float(losses[0]), float(losses[-1]))


def train_both(device: torch.device, quick: bool) -> tuple[list[Trained], Plan]:
    settings = plan(device, quick)
    return [train(arch, device, settings) for arch in ARCHS], settings


def table_rows(results: list[Trained], settings: Plan) -> list[list[str]]:
    rows = []
    for result in results:
        loss = f"{result.first_loss:.2f} -> {result.last_loss:.2f}"
        rows.append([
            result.arch, settings.preset, f"{settings.batch_size} x {settings.seq_len}", str(settings.steps),
            f"{result.tokens_per_second:,.0f}", result.peak_memory, loss if result.finite else f"**{loss}**",
        ])  # fmt: skip
    return rows
