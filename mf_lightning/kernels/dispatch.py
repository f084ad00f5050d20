"""Choice of the Memory Layer backend and the functional entry point every caller goes through.

A layer names its backend (``ModelConfig.backend``, ``model.overrides.backend`` in a config); ``auto``
picks ``triton`` for CUDA tensors when triton imports, else ``embedding_bag``. The triton table gradient's
mode (``ModelConfig.triton_backward``) and the first-call check of the triton kernels
(``ModelConfig.kernel_check``, :mod:`mf_lightning.kernels.guard`) travel with each call, as config fields,
never through the environment.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

from mf_lightning.kernels.embedding_bag import embedding_bag_memory_layer
from mf_lightning.kernels.fused_cpu import fused_cpu_applies, fused_cpu_memory_layer
from mf_lightning.kernels.guard import triton_agrees
from mf_lightning.kernels.hashing import check_score
from mf_lightning.kernels.reference import reference_memory_layer

BACKENDS = ("torch", "embedding_bag", "triton")
BACKWARD_MODES = ("deterministic", "atomic")
"""The triton table gradient: row pieces summed in a fixed order (bitwise repeatable), or ``atomic_add``."""
CHECK_MODES = ("warn", "fatal", "off")
"""The first-call check of the triton kernels on a GPU: warn and fall back to embedding_bag, raise, or skip."""


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


def check_choice(name: str, value: str, valid: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``valid``; raise a clear error naming the setting otherwise."""
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(valid)}; got {value!r}")
    return value


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device, kernel_check: str = "warn") -> str:
    """The concrete backend that runs a layer configured with ``backend`` on ``device``.

    ``triton`` on a GPU becomes ``embedding_bag`` for the rest of the process when the first-call check
    (``kernel_check``, :func:`~mf_lightning.kernels.guard.triton_agrees`) found the kernels disagreeing.
    A constant of a compiled graph: dynamo calls it while tracing, so the check runs eagerly, once.
    """
    check_backend_name(backend)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_usable(device) else "embedding_bag"
    if backend == "triton" and not triton_usable(device):
        reason = (
            "the triton package is not installed (pip install 'mf_lightning[triton]')"
            if not triton_importable()
            else f"the tensors are on {device.type}, and triton kernels need CUDA (or TRITON_INTERPRET=1)"
        )
        raise RuntimeError(
            f"Memory Layer backend 'triton' was requested but {reason}; "
            "use backend='embedding_bag' or 'torch', or 'auto' to choose automatically"
        )
    if backend == "triton" and not triton_agrees(device, kernel_check, backend_function("triton")):
        return "embedding_bag"
    return backend


BACKEND_FUNCTIONS = {
    "torch": ("reference", "reference_memory_layer"),
    "embedding_bag": ("embedding_bag", "embedding_bag_memory_layer"),
    "triton": ("triton_memory", "triton_memory_layer"),
}
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EMBEDDING_BAG_MIN_VALUES = 16384
"""Values a token gathers (tables x output width) from which compiled CPU code calls ``embedding_bag``."""


@functools.cache
def backend_function(backend: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The implementation of a concrete backend (contract: ``reference_memory_layer``); triton is imported only here."""
    module, name = BACKEND_FUNCTIONS[backend]
    return getattr(importlib.import_module(f"mf_lightning.kernels.{module}"), name)


def check_inputs(x: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None, backend: str) -> int:
    """Code length of ``tables [K, 2**tau, out]``, after checking that ``x`` and ``bias`` fit them and ``backend``.

    The one check of the tensors of a call; the backends trust it.
    """
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
    for name, tensor in (("x", x), ("bias", bias)):
        if tensor is not None and tensor.device != tables.device:
            raise ValueError(f"{name} is on {tensor.device} but the tables are on {tables.device}")
    if backend == "triton":
        for name, tensor in (("x", x), ("tables", tables), ("bias", bias)):
            if tensor is not None and tensor.dtype not in TRITON_DTYPES:
                raise TypeError(
                    f"the triton Memory Layer supports {', '.join(map(str, TRITON_DTYPES))}; {name} has dtype "
                    f"{tensor.dtype} (use backend='torch' or 'embedding_bag' for it)"
                )
    return code_bits


def memory_layer_and_buckets(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    score: str,
    temperature: float,
    backend: str,
    *,
    triton_backward: str = "deterministic",
    kernel_check: str = "warn",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[..., out]`` and integer buckets ``[..., K]`` of one forward, from the backend that computed both.

    ``score``, ``temperature``, ``triton_backward`` (one of :data:`BACKWARD_MODES`) and ``kernel_check`` (one
    of :data:`CHECK_MODES`) were checked where they entered (the ``MemoryLayer`` constructor or
    :func:`memory_layer`); the backend's name is checked as it is resolved, the tensors once per call.
    """
    concrete = resolve_backend(backend, x.device, kernel_check)
    code_bits = check_inputs(x, tables, bias, concrete)
    function = call_function(concrete, x, tables, bias)
    if concrete == "triton":
        deterministic = triton_backward == "deterministic"
        return function(x, tables, bias, code_bits, score, temperature, deterministic=deterministic)
    return function(x, tables, bias, code_bits, score, temperature)


def call_function(
    backend: str, x: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The implementation of ``backend`` that runs this call (contract: ``reference_memory_layer``).

    ``embedding_bag`` is a family on CPU. Without gradients, a call of a few tokens (a decoding step)
    runs the fused C++ operator (:mod:`mf_lightning.kernels.fused_cpu`), one call for the whole layer.
    Under ``torch.compile``, a layer where a token gathers fewer than :data:`EMBEDDING_BAG_MIN_VALUES`
    values runs the reference instead, whose hashing, gather and sum inductor fuses into a loop that
    costs no call (``debug``: 1.5 K values); the traced functions are imported here, not lazily.
    """
    if backend == "torch":
        return reference_memory_layer
    if backend == "triton":
        return backend_function(backend)
    num_tables, _, out_features = tables.shape
    if torch.compiler.is_compiling() and num_tables * out_features < EMBEDDING_BAG_MIN_VALUES:
        return reference_memory_layer
    if fused_cpu_applies(x, tables, bias):
        return fused_cpu_memory_layer
    return embedding_bag_memory_layer


def memory_layer(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    score: str = "scaled",
    temperature: float = 1.0,
    backend: str = "auto",
    triton_backward: str = "deterministic",
    kernel_check: str = "warn",
) -> torch.Tensor:
    """Functional Memory Layer: ``x [..., K*tau] -> [..., out]`` with ``tables [K, 2**tau, out]``."""
    check_score(score, temperature)
    check_choice("triton_backward", triton_backward, BACKWARD_MODES)
    check_choice("kernel_check", kernel_check, CHECK_MODES)
    return memory_layer_and_buckets(
        x, tables, bias, score, float(temperature), backend, triton_backward=triton_backward, kernel_check=kernel_check
    )[0]
