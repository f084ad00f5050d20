"""Triton Memory Layer: the kernels of :mod:`triton_kernels` registered as ``torch.library`` ops.

``mf_lightning::memory_layer_forward`` hashes each (token, table) once, gathers, and also returns the
buckets and scores; ``mf_lightning::memory_layer_backward`` reuses them for the input and dense table
gradients. Both are ``custom_op`` s with a fake (shape) function, and the forward carries an autograd
formula, so ``torch.compile`` traces the layer without graph breaks. (``triton_op`` would let inductor
see inside, but under ``TRITON_INTERPRET=1`` its generated fake function launches the interpreter on
fake tensors, so neither ``opcheck`` nor the CPU tests could run.)

The table gradient is deterministic by default (hits sorted by row, one program per row);
``MF_TRITON_BACKWARD=atomic`` selects the ``atomic_add`` kernel instead. Block sizes and warps are
autotuned per shape on a GPU; under the interpreter one small fixed configuration runs, which still
spans several tiles of the small test shapes.
"""

from __future__ import annotations

import os

import torch
import triton

from mf_lightning.kernels.dispatch import triton_interpreted
from mf_lightning.kernels.triton_kernels import (
    atomic_backward_kernel,
    chunk_gradient_kernel,
    gather_kernel,
    hash_kernel,
    row_gradient_kernel,
)

BACKWARD_ENV_VAR = "MF_TRITON_BACKWARD"
BACKWARD_MODES = ("deterministic", "atomic")
HASH_BLOCK_ELEMENTS = 1024
"""Chunk lanes (hits x padded code bits) per program of the hash and chunk-gradient kernels."""
ROW_TILE_ELEMENTS = 8192
"""Elements of ``dy`` (hits x padded width) a row-gradient program loads per step."""
INTERPRETED = triton_interpreted()


# Autotuning candidates on a GPU, as (block sizes, warps). None spills registers on sm_90 or sm_80 (see
# ``python -m mf_lightning.kernels.gpu_compile``); candidates that did were dropped: gather 16x2x128,
# 16x4x128, 32x2x128 and 8x8x128 at 4 warps, 16x2x256 and 32x4x128 at 8; atomic 32x128 and 64x64 at 4
# warps; the row gradient at 2 warps and width 4096. The last of each list uses the most registers (the
# one ``gpu_compile --covering`` checks).
GATHER_TUNING = [
    ({"BLOCK_N": 8, "BLOCK_K": 4, "BLOCK_D": 128}, 4),
    ({"BLOCK_N": 16, "BLOCK_K": 4, "BLOCK_D": 128}, 8),
    ({"BLOCK_N": 1, "BLOCK_K": 16, "BLOCK_D": 128}, 4),
    ({"BLOCK_N": 32, "BLOCK_K": 2, "BLOCK_D": 64}, 4),
]
ATOMIC_TUNING = [
    ({"BLOCK_N": 32, "BLOCK_D": 64}, 4),
    ({"BLOCK_N": 16, "BLOCK_D": 128}, 4),
    ({"BLOCK_N": 32, "BLOCK_D": 128}, 8),
]
ROW_GRADIENT_TUNING = [({}, 8), ({}, 4)]
HASH_WARPS = 4


def configs(tuning: list[tuple[dict, int]], interpreted: dict) -> list[triton.Config]:
    """Autotuning candidates on a GPU; one fixed configuration under the interpreter (nothing to time)."""
    if INTERPRETED:
        return [triton.Config(interpreted, num_warps=1)]
    return [triton.Config(kwargs, num_warps=warps) for kwargs, warps in tuning]


KEY = ["token_bucket", "num_tables", "out_features"]
tuned_gather = triton.autotune(configs(GATHER_TUNING, {"BLOCK_N": 16, "BLOCK_K": 2, "BLOCK_D": 32}), key=KEY)(
    gather_kernel
)
tuned_atomic_backward = triton.autotune(
    configs(ATOMIC_TUNING, {"BLOCK_N": 16, "BLOCK_D": 32}), key=KEY, reset_to_zero=["grad_tables_ptr"]
)(atomic_backward_kernel)
tuned_row_gradient = triton.autotune(configs(ROW_GRADIENT_TUNING, {}), key=["num_tables", "out_features"])(
    row_gradient_kernel
)


def backward_mode() -> str:
    """``deterministic`` (default) or ``atomic``, from ``MF_TRITON_BACKWARD``; a clear error otherwise."""
    mode = os.environ.get(BACKWARD_ENV_VAR, "").strip() or "deterministic"
    if mode not in BACKWARD_MODES:
        raise ValueError(f"{BACKWARD_ENV_VAR}={mode!r} is not a backward mode; valid: {', '.join(BACKWARD_MODES)}")
    return mode


def hits_per_program(code_bits: int) -> int:
    """Hits per program of the hash and chunk-gradient kernels: ``HASH_BLOCK_ELEMENTS`` padded lanes."""
    return HASH_BLOCK_ELEMENTS // triton.next_power_of_2(code_bits)


def row_tile_hits(out_features: int) -> int:
    """Hits per step of the row-gradient kernel, so that its ``dy`` tile stays ``ROW_TILE_ELEMENTS``."""
    return max(1, ROW_TILE_ELEMENTS // triton.next_power_of_2(out_features))


def empty_forward_outputs(x: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised ``y [N, D]`` (tables' dtype), buckets ``[N, K]`` int32 and scores ``[N, K]`` float32."""
    num_tokens = x.shape[0]
    num_tables, _, out_features = tables.shape
    return (
        torch.empty((num_tokens, out_features), device=x.device, dtype=tables.dtype),
        torch.empty((num_tokens, num_tables), device=x.device, dtype=torch.int32),
        torch.empty((num_tokens, num_tables), device=x.device, dtype=torch.float32),
    )


@torch.library.custom_op("mf_lightning::memory_layer_forward", mutates_args=())
def memory_layer_forward(
    x: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None, code_bits: int, score: str, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [N, K*tau]`` -> (``y [N, D]`` in the tables' dtype, buckets ``[N, K]`` int32, scores ``[N, K]`` fp32)."""
    num_tokens = x.shape[0]
    num_tables, num_rows, out_features = tables.shape
    y, buckets, scores = empty_forward_outputs(x, tables)
    num_hits = num_tokens * num_tables
    block_hits = hits_per_program(code_bits)
    hash_kernel[(triton.cdiv(num_hits, block_hits),)](
        x, buckets, scores, num_hits, num_tables, x.stride(0), x.stride(1), 2.0 / temperature,
        CODE_BITS=code_bits, TAU_PAD=triton.next_power_of_2(code_bits), SCALED=score == "scaled",
        BLOCK_HITS=block_hits, num_warps=HASH_WARPS,
    )  # fmt: skip

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(num_tokens, meta["BLOCK_N"]), triton.cdiv(out_features, meta["BLOCK_D"])

    tuned_gather[grid](
        tables, bias, buckets, scores, y, num_tokens, num_tables, num_rows, out_features,
        triton.next_power_of_2(num_tokens), HAS_BIAS=bias is not None,
    )  # fmt: skip
    return y, buckets, scores


@memory_layer_forward.register_fake
def _(x, tables, bias, code_bits, score, temperature):
    return empty_forward_outputs(x, tables)


@torch.library.custom_op("mf_lightning::memory_layer_backward", mutates_args=())
def memory_layer_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    tables: torch.Tensor,
    buckets: torch.Tensor,
    scores: torch.Tensor,
    code_bits: int,
    score: str,
    temperature: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``grad_x`` like ``x`` but contiguous, dense contiguous ``grad_tables`` like ``tables``) from ``grad_y [N, D]``.

    ``deterministic`` picks the sorted, atomic-free table gradient; otherwise it is accumulated by
    float32 ``atomic_add`` (fp16/bf16 atomics are slow or missing) and cast last.
    """
    grad_y = grad_y.contiguous()
    args = (grad_y, x, tables, buckets, scores, code_bits, score == "scaled", 2.0 / temperature)
    return sorted_backward(*args) if deterministic else atomic_backward(*args)


def sorted_backward(grad_y, x, tables, buckets, scores, code_bits, scaled, two_over_t) -> tuple[torch.Tensor, ...]:
    """Table gradient by row segments of the hits sorted by row, then the input gradient from ``g_c``.

    Rows run in descending order of hits, so with fewer hits than rows only the first ``hits`` rows
    can have any: the grid stops there and the gradient starts from zeros.
    """
    num_tables, num_rows, out_features = tables.shape
    rows = (buckets + torch.arange(0, num_tables * num_rows, num_rows, device=x.device, dtype=torch.int32)).view(-1)
    sorted_rows, sorted_hits = torch.sort(rows, stable=True)
    all_rows = torch.arange(num_tables * num_rows + 1, device=x.device, dtype=torch.int32)
    segment_starts = torch.searchsorted(sorted_rows, all_rows)
    row_order = torch.sort(segment_starts.diff(), descending=True, stable=True).indices
    num_programs = min(num_tables * num_rows, rows.numel())
    unvisited_rows_possible = num_programs < num_tables * num_rows
    new_tensor = torch.zeros if unvisited_rows_possible else torch.empty
    grad_tables = new_tensor(tables.shape, device=x.device, dtype=tables.dtype)
    grad_scores = torch.empty(rows.shape, device=x.device, dtype=torch.float32)
    tuned_row_gradient[(num_programs,)](
        grad_y, tables, scores, sorted_hits, segment_starts, row_order, grad_tables, grad_scores,
        num_tables, out_features, D_PAD=triton.next_power_of_2(out_features),
        BLOCK_HITS=row_tile_hits(out_features),
    )  # fmt: skip
    grad_x = x.new_empty(x.shape)
    block_hits = hits_per_program(code_bits)
    chunk_gradient_kernel[(triton.cdiv(rows.numel(), block_hits),)](
        x, grad_scores, grad_x, rows.numel(), num_tables, x.stride(0), x.stride(1), two_over_t,
        CODE_BITS=code_bits, TAU_PAD=triton.next_power_of_2(code_bits), SCALED=scaled,
        BLOCK_HITS=block_hits, num_warps=HASH_WARPS,
    )  # fmt: skip
    return grad_x, grad_tables


def atomic_backward(grad_y, x, tables, buckets, scores, code_bits, scaled, two_over_t) -> tuple[torch.Tensor, ...]:
    """Input gradient and float32 ``atomic_add`` table gradient in one kernel, cast to the tables' dtype."""
    num_tokens = x.shape[0]
    num_tables, num_rows, out_features = tables.shape
    grad_x = x.new_empty(x.shape)
    grad_tables = torch.zeros(tables.shape, device=tables.device, dtype=torch.float32)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(num_tokens, meta["BLOCK_N"]), num_tables

    tuned_atomic_backward[grid](
        grad_y, x, tables, buckets, scores, grad_x, grad_tables,
        num_tokens, num_tables, num_rows, out_features, x.stride(0), x.stride(1), two_over_t,
        triton.next_power_of_2(num_tokens), CODE_BITS=code_bits, TAU_PAD=triton.next_power_of_2(code_bits),
        SCALED=scaled,
    )  # fmt: skip
    return grad_x, grad_tables.to(tables.dtype)


@memory_layer_backward.register_fake
def _(grad_y, x, tables, buckets, scores, code_bits, score, temperature, deterministic):
    return x.new_empty(x.shape), tables.new_empty(tables.shape)


def setup_context(ctx, inputs: tuple, output: tuple) -> None:
    """Keep what the backward needs: the input, the tables, and the forward's buckets and scores."""
    x, tables, bias, code_bits, score, temperature = inputs
    _, buckets, scores = output
    ctx.save_for_backward(x, tables, buckets, scores)
    ctx.code_bits, ctx.score, ctx.temperature = code_bits, score, temperature
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(buckets, scores)


def backward(ctx, grad_y: torch.Tensor, _grad_buckets: None, _grad_scores: None) -> tuple:
    """Gradients of ``x``, ``tables`` and ``bias`` (the latter is ``grad_y`` summed over tokens)."""
    x, tables, buckets, scores = ctx.saved_tensors
    deterministic = backward_mode() == "deterministic"
    grad_x, grad_tables = memory_layer_backward(
        grad_y, x, tables, buckets, scores, ctx.code_bits, ctx.score, ctx.temperature, deterministic
    )
    grad_bias = None if ctx.bias_dtype is None else grad_y.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_tables, grad_bias, None, None, None


memory_layer_forward.register_autograd(backward, setup_context=setup_context)


def triton_memory_layer(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    code_bits: int,
    score: str,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[..., D]`` and int32 buckets ``[..., K]``, computed by the triton kernels.

    Same contract as :func:`mf_lightning.kernels.reference.reference_memory_layer`; the inputs were
    checked by :func:`mf_lightning.kernels.dispatch.check_inputs`.
    """
    bias = None if bias is None else bias.contiguous()
    y, buckets, _ = memory_layer_forward(
        x.reshape(-1, x.shape[-1]), tables.contiguous(), bias, code_bits, score, float(temperature)
    )
    return y.reshape(*x.shape[:-1], tables.shape[-1]), buckets.reshape(*x.shape[:-1], tables.shape[0])
