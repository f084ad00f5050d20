"""``GPTNeoXRMSNorm``: the RMSNorm of GPT-NeoX (``megatron/model/norms.py``), which the MemoryFormer authors' code uses.

``w * x / (rms(x) + eps)`` with ``rms(x) = ||x||_2 / sqrt(d)``: the epsilon is added to the rms, not inside
the square root as in ``torch.nn.RMSNorm`` (``w * x * rsqrt(mean(x**2) + eps)``), and it is 1e-8. The two
are not interchangeable in MemoryFormer: at the residual stream's initial scale (std 0.02) torch's form with
eps 1e-5 is 0.6-1.2 % smaller, enough to flip the signs a Memory Layer hashes (SPEC §2).
"""

from __future__ import annotations

import torch
from torch import nn


class GPTNeoXRMSNorm(nn.Module):
    """``weight * (x / (||x||_2 / sqrt(d) + eps))`` over the last dimension ``d``; ``weight`` starts at 1.

    Computed in float32 (a no-op for float32 inputs, where it is GPT-NeoX's arithmetic operation for
    operation) and returned in the input's dtype. The parameter is named ``weight``, as torch's norms.
    """

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x.float()
        rms = values.norm(2, dim=-1, keepdim=True) * self.weight.shape[0] ** -0.5
        return self.weight * (values / (rms + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps:g}"
