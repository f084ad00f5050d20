"""The fused CPU operators of decoding: a Memory Layer (hash, score, gather and sum of a few tokens) and the
attention of one query over a static KV cache, each one C++ call.

Decoding reads one token's rows per layer, a few hundred KB, in tens of µs; the operator chain of
:func:`~mf_lightning.kernels.embedding_bag.embedding_bag_memory_layer` (hash, scores, offsets,
``embedding_bag``) costs about as much again in calls, and ``embedding_bag`` reads scattered rows at
a fraction of the memory bandwidth. ``fused_cpu.cpp`` does the whole layer in one loop per token, streaming
eight rows at once, at several times that bandwidth (``benchmarks/decode.py``). It has no backward: it serves the ``embedding_bag`` backend on
CPU where no gradient is recorded and a call holds at most :data:`MAX_TOKENS` tokens (decoding steps),
eagerly and inside the compiled decoding step. The attention of a decoding step's one query over the
static KV cache (:func:`fused_cpu_attention`) is the same kind of loop: SDPA costs 20-100 µs a call
over a short cache, more than the bytes it reads, and reads every slot of the cache, masked or not.

The operator is built by torch's C++ extension builder the first time a process needs it (about 10 s
on 2 cores, then loaded from the build cache, ``TORCH_EXTENSIONS_DIR``, in about 10 ms). It is
built for this machine's vector instructions, which name the build, so a cache shared by machines of
different CPUs keeps one build per kind. Where it cannot be built (no C++ compiler), the layer keeps
the operator chain after one warning, with the same results. "building the fused CPU Memory Layer" is
logged only when the load is still running after ``BUILD_NOTICE_SECONDS`` (it is compiling, not loading
the cached build), so a run that loads it from the cache says nothing about it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import platform
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from mf_lightning.fs.lock import FileLock

SOURCE = Path(__file__).with_name("fused_cpu.cpp")
MAX_TOKENS = 16
"""Most tokens of a call the fused operator takes (it runs on one thread; larger calls are not decoding)."""
DTYPES = (torch.float32, torch.bfloat16)
VECTOR_FLAGS = {"AVX512": ["-march=x86-64-v4"], "AVX2": ["-march=x86-64-v3"]}
"""Compiler flags per ``torch.backends.cpu.get_cpu_capability()`` on x86; others build for the baseline."""

BUILD_NOTICE_SECONDS = 1.0
"""How long loading the operator may take before it is told to be a build: a cached load takes ~10 ms."""
BUILDER_LOCK = ".mf-builder.lock"
TORCH_BATON = "lock"
"""torch's own lock file of a build folder (``torch.utils.file_baton``), held while it compiles."""

log = logging.getLogger(__name__)


def fused_cpu_applies(x: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether this call of an ``embedding_bag`` layer runs through the fused operator."""
    return (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and x.numel() <= MAX_TOKENS * x.shape[-1]
        and tables.dtype in DTYPES
        and x.dtype == tables.dtype
        and (bias is None or bias.dtype == tables.dtype)
        and fused_cpu_available()
    )


def fused_cpu_memory_layer(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    code_bits: int,
    score: str,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`mf_lightning.kernels.reference.reference_memory_layer`, without a gradient."""
    y, buckets = torch.ops.mf_lightning.memory_layer_inference(
        x.reshape(-1, x.shape[-1]).contiguous(), tables.contiguous(), bias, score == "scaled", temperature
    )
    return y.view(*x.shape[:-1], tables.shape[2]), buckets.view(*x.shape[:-1], tables.shape[0])


def fused_attention_applies(q: torch.Tensor, keys: torch.Tensor, dropout: float) -> bool:
    """Whether the attention of queries ``q [B, H, T, S]`` over a static cache's ``keys`` runs through the fused
    operator: one query per sequence (a decoding step) on CPU, no gradient, no dropout, a supported dtype."""
    return (
        q.device.type == "cpu"
        and q.shape[2] == 1
        and dropout == 0.0
        and not torch.is_grad_enabled()
        and q.dtype in DTYPES
        and keys.dtype == q.dtype
        and fused_cpu_available()
    )


def fused_cpu_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor
) -> torch.Tensor:
    """``softmax(q k / sqrt(S)) v`` of one query per head ``q [B, H, 1, S]`` over slots ``0 .. position`` of a
    static KV cache ``keys``/``values [B, H, max_len, S]``: SDPA's result with the cache's mask, reading only
    the filled slots (SDPA reads them all, masked)."""
    return torch.ops.mf_lightning.attention_inference(q.contiguous(), keys, values, position)


@torch.compiler.assume_constant_result
def fused_cpu_available() -> bool:
    """Whether the operator is registered, after building it if need be. A constant of compiled graphs: it runs,
    and may build, while dynamo traces."""
    return load_fused_cpu()


@functools.cache
def load_fused_cpu() -> bool:
    """Build (or load from the cache) and register the operator once per process; False, after one warning,
    where that fails."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = VECTOR_FLAGS.get(capability, []) if platform.machine() in ("x86_64", "AMD64") else []
    name = f"mf_lightning_fused_cpu_{capability.lower()}"
    try:
        from torch.utils.cpp_extension import get_default_build_root, load

        build = Path(get_default_build_root()) / f"{name}_py{sys.version_info.major}{sys.version_info.minor}"
        with (
            builder_lock(build, name),
            ninja_on_path(),
            told_when_slow(f"building the fused CPU Memory Layer {name} (once per machine, about 10 s)"),
        ):
            load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-fopenmp-simd", *flags],
                is_python_module=False,
                build_directory=str(build),
            )
    except Exception as error:  # whatever stops the build (no compiler, no ninja, a failed compile)
        message = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        warnings.warn(
            f"the fused CPU Memory Layer could not be built ({message}); decoding on CPU uses the slower "
            "embedding_bag operator chain",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    torch.library.register_fake("mf_lightning::memory_layer_inference")(memory_layer_inference_shapes)
    torch.library.register_fake("mf_lightning::attention_inference")(attention_inference_shape)
    return True


@contextlib.contextmanager
def builder_lock(build: Path, name: str) -> Iterator[None]:
    """Holds this machine's one builder lock of the folder ``build`` (``fs.lock``: a dead holder's is taken over).

    torch's builder guards a build with its own lock file, ``build/lock``, which a builder killed mid-build
    leaves behind, and every later process then waits for it forever. Every builder of ``build`` holds this
    lock first, so a ``lock`` file found while holding it belongs to no live build, and is removed."""
    build.mkdir(parents=True, exist_ok=True)
    with FileLock(build / BUILDER_LOCK, f"the build of {name}"):
        (build / TORCH_BATON).unlink(missing_ok=True)
        yield


@contextlib.contextmanager
def told_when_slow(message: str, seconds: float | None = None) -> Iterator[None]:
    """Logs ``message`` (INFO) if the block still runs after ``seconds`` (``BUILD_NOTICE_SECONDS``), else nothing."""
    timer = threading.Timer(BUILD_NOTICE_SECONDS if seconds is None else seconds, log.info, args=(message,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@contextlib.contextmanager
def ninja_on_path() -> Iterator[None]:
    """torch's builder runs ``ninja`` from PATH: add the ninja wheel's binary while it builds, where PATH lacks
    one (a virtual environment's python run without activating the environment)."""
    if shutil.which("ninja") is not None or importlib.util.find_spec("ninja") is None:
        yield
        return
    import ninja

    path = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def attention_inference_shape(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor
) -> torch.Tensor:
    """Output of the attention operator without computing it (for ``torch.compile``'s tracing)."""
    return q.new_empty(q.shape)


def memory_layer_inference_shapes(
    x: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None, scaled: bool, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the operator without computing them (for ``torch.compile``'s tracing)."""
    tokens, (num_tables, _, out_features) = x.shape[0], tables.shape
    return x.new_empty(tokens, out_features, dtype=tables.dtype), x.new_empty(tokens, num_tables, dtype=torch.int64)
