"""Choice of the Memory Layer backend and the functional entry point every caller goes through.

Precedence: a backend named on the layer (anything but ``auto``) wins; otherwise the environment
variable ``MF_KERNEL_BACKEND`` decides; otherwise ``auto`` picks ``triton`` for CUDA tensors when
triton imports, else ``embedding_bag``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

BACKENDS = ("torch", "embedding_bag", "triton")
ENV_VAR = "MF_KERNEL_BACKEND"


@functools.cache
def triton_importable() -> bool:
    """True when the ``triton`` package is installed (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    """Whether the triton kernels can run on tensors of ``device``."""
    if not triton_importable():
        return False
    return device.type == "cuda" or triton_interpreted()


def check_backend_name(backend: str) -> str:
    """Return ``backend`` if it names a backend or ``auto``; raise a clear error otherwise."""
    valid = ("auto", *BACKENDS)
    if backend not in valid:
        raise ValueError(f"unknown Memory Layer backend {backend!r}; valid: {', '.join(valid)}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend that runs a layer configured with ``backend`` on ``device``."""
    check_backend_name(backend)
    source = "backend argument"
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env not in ("auto", *BACKENDS):
                raise ValueError(
                    f"{ENV_VAR}={env!r} is not a Memory Layer backend; valid: auto, {', '.join(BACKENDS)}"
                )
            backend, source = env, f"{ENV_VAR}"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "embedding_bag"
    if backend == "triton" and not triton_usable(device):
        reason = (
            "the triton package is not installed (pip install 'mf_lightning[triton]')"
            if not triton_importable()
            else f"the tensors are on {device.type}, and triton kernels need CUDA (or TRITON_INTERPRET=1)"
        )
        raise RuntimeError(
            f"Memory Layer backend 'triton' was requested ({source}) but {reason}; "
            "use backend='embedding_bag' or 'torch', or 'auto' to choose automatically"
        )
    return backend


@functools.cache
def backend_function(backend: str) -> Callable[..., torch.Tensor]:
    """The ``memory_layer`` implementation of a concrete backend; triton is imported only here."""
    module = {"torch": "reference", "embedding_bag": "embedding_bag", "triton": "triton_memory"}[backend]
    return importlib.import_module(f"mf_lightning.kernels.{module}").memory_layer


def check_shapes(x: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Code length of ``tables [K, 2**tau, out]``, after checking that ``x`` and ``bias`` fit them."""
    num_tables, num_rows, out_features = tables.shape
    code_bits = num_rows.bit_length() - 1
    if num_rows != 2**code_bits:
        raise ValueError(f"tables must have 2**code_bits rows per table, got {num_rows}")
    if not x.is_floating_point():
        raise TypeError(f"Memory Layer input must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[-1] != num_tables * code_bits:
        raise ValueError(
            f"Memory Layer expects inputs of width {num_tables * code_bits} "
            f"({num_tables} tables x {code_bits} bits), got shape {tuple(x.shape)}"
        )
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    return code_bits


def memory_layer(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    score: str = "scaled",
    temperature: float = 1.0,
    backend: str = "auto",
    buckets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Functional Memory Layer: ``x [..., K*tau] -> [..., out]`` with ``tables [K, 2**tau, out]``.

    ``buckets`` are this input's bucket indices ``[..., K]`` when the caller has already hashed it.
    """
    code_bits = check_shapes(x, tables, bias)
    impl = backend_function(resolve_backend(backend, x.device))
    return impl(x, tables, bias, code_bits, score, temperature, buckets)
