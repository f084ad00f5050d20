"""The Memory Layer against ``nn.Linear`` at the widths of the presets, with the bandwidth it achieves.

Each preset's ``n_embd -> n_embd`` layer (code_bits 8) is timed forward (inference mode) and
forward+backward at one token count, on every backend that runs on the device, beside ``nn.Linear`` of
the same shape (the layers skip the first-call triton check: the agreement stage checks every kernel,
and a fallback here would time embedding_bag under triton's name). A forward's bytes are the table rows it gathers plus input and output (``nn.Linear``: its
weight plus input and output); over the time that is its achieved bandwidth, given as a share of the
device's copy bandwidth measured first (read + write), the practical peak of a memory-bound kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mf_lightning.config import PRESETS
from mf_lightning.doctor.timing import copy_bandwidth, time_module
from mf_lightning.kernels.dispatch import triton_usable
from mf_lightning.nn import MemoryLayer

SPEED_PRESETS = ("tiny", "small", "base")
CODE_BITS = 8


@dataclass(frozen=True)
class Plan:
    """What the speed stage measures on a device: dtype, tokens, seconds per timing, copy size."""

    dtype: torch.dtype
    tokens: int
    min_run_time: float
    copy_bytes: int


def plan(device: torch.device, quick: bool) -> Plan:
    """bfloat16 at 16384 tokens on a GPU (training's micro-batch scale); float32 at 256 tokens on a CPU."""
    if device.type == "cuda":
        return Plan(torch.bfloat16, 16384, 0.05 if quick else 0.1, 2**30)
    return Plan(torch.float32, 64 if quick else 256, 0.02 if quick else 0.1, 2**26 if quick else 2**28)


@dataclass(frozen=True)
class Timing:
    """One implementation at one width: forward and forward+backward seconds, forward bytes moved."""

    preset: str
    width: int
    implementation: str
    forward_s: float
    train_step_s: float
    forward_bytes: int


def memory_layer_bytes(tokens: int, num_tables: int, width: int, in_features: int, element: int) -> int:
    """Bytes a Memory Layer forward moves: ``num_tables`` rows of ``width`` per token, input and output."""
    return (tokens * num_tables * width + tokens * (in_features + width)) * element


def linear_bytes(tokens: int, in_features: int, width: int, element: int) -> int:
    """Bytes an ``nn.Linear`` forward moves: its weight once, input and output."""
    return (in_features * width + tokens * (in_features + width)) * element


def backends(device: torch.device) -> list[str]:
    """The fast backends on ``device``: embedding_bag, and triton on a GPU."""
    return ["embedding_bag"] + (["triton"] if device.type == "cuda" and triton_usable(device) else [])


def measure(device: torch.device, quick: bool) -> tuple[float, list[Timing], Plan]:
    """The copy bandwidth (bytes/s) and each implementation's timings at each preset width."""
    settings = plan(device, quick)
    bandwidth = copy_bandwidth(device, settings.min_run_time, settings.copy_bytes)
    element = torch.finfo(settings.dtype).bits // 8
    factory = {"device": device, "dtype": settings.dtype}
    timings = []
    for preset in SPEED_PRESETS[:1] if quick else SPEED_PRESETS:
        width = PRESETS[preset]["n_embd"]
        x = torch.randn(settings.tokens, width, **factory)
        linear = nn.Linear(width, width, **factory)
        forward_s, train_step_s = time_module(linear, x, settings.min_run_time)
        moved = linear_bytes(settings.tokens, width, width, element)
        timings.append(Timing(preset, width, "nn.Linear", forward_s, train_step_s, moved))
        for backend in backends(device):
            layer = MemoryLayer(width, width, CODE_BITS, backend=backend, kernel_check="off", **factory)
            forward_s, train_step_s = time_module(layer, x, settings.min_run_time)
            moved = memory_layer_bytes(settings.tokens, layer.num_tables, width, width, element)
            timings.append(Timing(preset, width, backend, forward_s, train_step_s, moved))
        del x, linear
    return bandwidth, timings, settings


def table_rows(timings: list[Timing], bandwidth: float) -> list[list[str]]:
    """Markdown rows: preset, width, implementation, times, GB/s, share of the copy bandwidth, vs Linear."""
    linear = {t.preset: t for t in timings if t.implementation == "nn.Linear"}
    rows = []
    for t in timings:
        achieved = t.forward_bytes / t.forward_s
        base = linear[t.preset]
        rows.append([
            t.preset, str(t.width), t.implementation, f"{t.forward_s * 1e3:.3f}", f"{achieved / 1e9:.1f}",
            f"{100 * achieved / bandwidth:.0f}%", f"{t.forward_s / base.forward_s:.2f}x",
            f"{t.train_step_s * 1e3:.3f}", f"{t.train_step_s / base.train_step_s:.2f}x",
        ])  # fmt: skip
    return rows
