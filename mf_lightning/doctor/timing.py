"""How every measurement of ``mf doctor`` and ``benchmarks/`` is timed, on a CPU or a GPU.

torch is imported by the functions, not with the module (``benchmarks/harness.py`` re-exports them to
scripts that import torch only when they measure it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it; nothing on CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], min_run_time: float = 0.2) -> float:
    """Median time of ``fn()`` after one warm-up call (``torch.utils.benchmark`` synchronises CUDA around runs)."""
    from torch.utils import benchmark

    fn()
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def time_module(
    module: nn.Module, x: torch.Tensor, min_run_time: float, forward_only: bool = False
) -> tuple[float, float | None]:
    """Forward time (inference mode, as in decoding) and forward+backward time (input and every parameter
    take gradients, fresh each step); ``None`` for the latter with ``forward_only``."""

    import torch

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    leaf = x.detach().requires_grad_()
    grad_y = torch.randn_like(forward())

    def train_step() -> None:
        module.zero_grad(set_to_none=True)
        leaf.grad = None
        module(leaf).backward(grad_y)

    forward_s = median_seconds(forward, min_run_time)
    return forward_s, None if forward_only else median_seconds(train_step, min_run_time)


def copy_bandwidth(device: torch.device, min_run_time: float, num_bytes: int = 2**30) -> float:
    """Bytes/s of a ``num_bytes`` copy within ``device``'s memory (read + write): its practical peak."""
    import torch

    source = torch.empty(num_bytes // 4, device=device, dtype=torch.float32).uniform_()
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), min_run_time)
    return 2 * source.numel() * source.element_size() / seconds
