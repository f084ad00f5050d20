"""``MemoryLayer``: the drop-in replacement for ``nn.Linear`` that hashes instead of multiplying."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mf_lightning.checks import positive_int
from mf_lightning.kernels.dispatch import (
    BACKWARD_MODES,
    CHECK_MODES,
    check_backend_name,
    check_choice,
    memory_layer_and_buckets,
)
from mf_lightning.kernels.hashing import MAX_CODE_BITS, bucket_indices, check_score


class MemoryLayer(nn.Module):
    """Maps ``[..., in_features]`` to ``[..., out_features]`` by sign-hashing chunks into learned tables.

    The input is cut into ``num_tables = in_features // code_bits`` chunks; each chunk selects one of
    the ``2**code_bits`` rows of its own table by the signs of its entries, and the output is the sum of
    the selected rows weighted by a differentiable score of the chunk (``score="scaled"``, the authors'
    code, or ``"paper"``). Work per token is ``num_tables * out_features`` multiply-adds, ``code_bits``
    times fewer than ``nn.Linear``; memory is ``2**code_bits / code_bits`` times more.

    Several outputs that hash the same input (attention's Q, K and V) share one hash by being one
    layer of the summed width whose output is split: tables ``[K, R, 3d]`` are exactly three tables
    ``[K, R, d]`` addressed by the same bucket and score.

    ``backend`` is ``auto`` (triton on CUDA when available, else embedding_bag), or one of ``torch``,
    ``embedding_bag``, ``triton``. ``triton_backward`` is the triton table gradient (``deterministic`` or
    ``atomic``); ``kernel_check`` what the first triton call of the process on a GPU does when the kernels
    disagree with embedding_bag (``warn`` and fall back, ``fatal``, or ``off``: :mod:`mf_lightning.kernels.guard`).

    :meth:`observe_buckets` lets diagnostics see the bucket indices of every forward without hashing
    the input a second time.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        code_bits: int = 8,
        bias: bool = True,
        score: str = "scaled",
        temperature: float = 1.0,
        backend: str = "auto",
        init_std: float = 0.02,
        bias_init_std: float = 1e-3,
        triton_backward: str = "deterministic",
        kernel_check: str = "warn",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_layer_args(in_features, out_features, code_bits, score, temperature)
        self.in_features = in_features
        self.out_features = out_features
        self.code_bits = code_bits
        self.num_tables = in_features // code_bits
        self.score = score
        self.temperature = float(temperature)
        self.backend = check_backend_name(backend)
        self.triton_backward = check_choice("triton_backward", triton_backward, BACKWARD_MODES)
        self.kernel_check = check_choice("kernel_check", kernel_check, CHECK_MODES)
        self.init_std = init_std
        self.bias_init_std = bias_init_std
        factory = {"device": device, "dtype": dtype}
        self.tables = nn.Parameter(torch.empty(self.num_tables, 2**code_bits, out_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.bucket_observers: OrderedDict[int, Callable[[torch.Tensor], None]] = OrderedDict()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Tables ``N(0, init_std**2)``, bias ``N(0, bias_init_std**2)`` (SPEC §1.5, §2)."""
        nn.init.normal_(self.tables, std=self.init_std)
        if self.bias is not None:
            nn.init.normal_(self.bias, std=self.bias_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, buckets = memory_layer_and_buckets(
            x,
            self.tables,
            self.bias,
            self.score,
            self.temperature,
            self.backend,
            triton_backward=self.triton_backward,
            kernel_check=self.kernel_check,
        )
        if self.bucket_observers:
            buckets = buckets.long()
            for observer in self.bucket_observers.values():
                observer(buckets)
        return y

    def observe_buckets(self, observer: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """Call ``observer(buckets)`` with the int64 bucket indices ``[..., num_tables]`` of every forward.

        Every backend returns the buckets its forward computed with the output, so observing costs no
        second hash. Returns a handle whose ``remove()`` detaches the observer.
        """
        handle = RemovableHandle(self.bucket_observers)
        self.bucket_observers[handle.id] = observer
        return handle

    @torch.no_grad()
    def bucket_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Bucket chosen in each table for each token: int64 ``[..., num_tables]`` (no gradient)."""
        return bucket_indices(x.reshape(*x.shape[:-1], self.num_tables, self.code_bits))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, code_bits={self.code_bits}, "
            f"num_tables={self.num_tables}, bias={self.bias is not None}, score={self.score!r}, "
            f"backend={self.backend!r}"
        )


def check_layer_args(in_features: int, out_features: int, code_bits: int, score: str, temperature: float) -> None:
    """Reject a Memory Layer configuration with a message naming the value and what is valid."""
    positive_int("in_features", in_features)
    positive_int("out_features", out_features)
    if isinstance(code_bits, bool) or not isinstance(code_bits, int) or not 1 <= code_bits <= MAX_CODE_BITS:
        raise ValueError(f"code_bits must be an integer in 1..{MAX_CODE_BITS}, got {code_bits!r}")
    if in_features % code_bits:
        raise ValueError(
            f"in_features={in_features} is not divisible by code_bits={code_bits}: the input is cut into "
            f"chunks of code_bits entries (try in_features={in_features - in_features % code_bits or code_bits} "
            f"or a code_bits that divides {in_features})"
        )
    check_score(score, temperature)
