"""Triton Memory Layer: the kernels of :mod:`triton_kernels` registered as ``torch.library`` ops.

``mf_lightning::memory_layer_forward`` hashes each (token, table) once, gathers, and also returns the
buckets and scores; ``mf_lightning::memory_layer_backward`` reuses them for the input and dense table
gradients. Both are ``custom_op`` s with a fake (shape) function, and the forward carries an autograd
formula, so ``torch.compile`` traces the layer without graph breaks. (``triton_op`` would let inductor
see inside, but under ``TRITON_INTERPRET=1`` its generated fake function launches the interpreter on
fake tensors, so neither ``opcheck`` nor the CPU tests could run.)

The table gradient is deterministic by default (hits sorted by row, each row's hits cut into pieces of
at most ``PIECE_HITS``, one program per piece, long rows' partial sums added in piece order);
``deterministic=False`` (``ModelConfig.triton_backward: atomic``) selects the ``atomic_add`` kernel instead.

Configurations: the forward gather is autotuned per shape on a GPU, and every candidate gives the same
bits (it adds tables one at a time in table order, whatever its block sizes). The deterministic backward
is not autotuned: its kernels run one configuration fixed by the shape (``ROW_GRADIENT_WARPS``,
``row_tile_hits``, ``COMBINE_BLOCK_D``), so its bits cannot depend on a timing. Only the atomic backward,
nondeterministic anyway, is autotuned. Under the interpreter one small fixed configuration runs, which
still spans several tiles of the small test shapes.
"""

from __future__ import annotations

import torch
import triton

from mf_lightning.kernels.dispatch import triton_interpreted
from mf_lightning.kernels.triton_kernels import (
    atomic_backward_kernel,
    chunk_gradient_kernel,
    combine_partials_kernel,
    gather_kernel,
    hash_kernel,
    row_gradient_kernel,
)

HASH_BLOCK_ELEMENTS = 1024
"""Chunk lanes (hits x padded code bits) per program of the hash and chunk-gradient kernels."""
ROW_TILE_ELEMENTS = 8192
"""Elements of ``dy`` (hits x padded width) a row-gradient program loads per step."""
ROW_GRADIENT_WARPS = 8
"""The row gradient's one configuration: at widths 1024 and 4096 it uses no stack on sm_80 or sm_90 with
triton 3.6 or 3.9, where 4 warps spill on sm_80 with triton 3.6 and a 4096-element tile at 8 warps takes
8 bytes of stack for fp16 on sm_80 with triton 3.9 (``gpu_compile``)."""
COMBINE_BLOCK_D = 512
COMBINE_WARPS = 4
PIECE_HITS = 2048
"""Most hits one row-gradient program sums: a longer row is cut into pieces whose float32 partial sums are
added by ``combine_partials_kernel``. Four times the mean hits per row of a 131,072-token micro-batch
over 256-row tables, so balanced rows stay whole; a row holding every token becomes 64 pieces. The
partial sums need at most ``2 * hits / PIECE_HITS`` float32 rows of the output width, allocated for the
backward of one layer (64 MiB for 131,072 tokens through 128 tables of width 1024)."""
INTERPRETED = triton_interpreted()
"""Fixed when this module is imported, because triton fixes it then too: ``@triton.jit`` makes each kernel an
interpreted or a compiled function as it decorates it (``TRITON_INTERPRET``), and the autotuning lists below
follow that choice. This module is imported only on the first triton Memory Layer call, not with the package."""


# Autotuning candidates on a GPU, as (block sizes, warps). None spills registers on sm_90 or sm_80 (see
# ``python -m mf_lightning.kernels.gpu_compile``); candidates that did were dropped: gather 16x2x128,
# 16x4x128, 32x2x128 and 8x8x128 at 4 warps, 16x2x256 and 32x4x128 at 8; atomic 32x128 and 64x64 at 4
# warps. The last of each list uses the most registers (the one ``gpu_compile --covering`` checks).
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
HASH_WARPS = 4
INTERPRETED_GATHER = {"BLOCK_N": 16, "BLOCK_K": 2, "BLOCK_D": 32}


def configs(tuning: list[tuple[dict, int]], interpreted: dict) -> list[triton.Config]:
    """Autotuning candidates on a GPU; one fixed configuration under the interpreter (nothing to time)."""
    if INTERPRETED:
        return [triton.Config(interpreted, num_warps=1)]
    return [triton.Config(kwargs, num_warps=warps) for kwargs, warps in tuning]


KEY = ["token_bucket", "NUM_TABLES", "out_features"]
tuned_gather = triton.autotune(configs(GATHER_TUNING, INTERPRETED_GATHER), key=KEY)(gather_kernel)
tuned_atomic_backward = triton.autotune(
    configs(ATOMIC_TUNING, {"BLOCK_N": 16, "BLOCK_D": 32}),
    key=["token_bucket", "num_tables", "out_features"],
    reset_to_zero=["grad_tables_ptr"],
)(atomic_backward_kernel)


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
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    code_bits: int,
    score: str,
    temperature: float,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [N, K*tau]`` -> (``y [N, D]`` in the tables' dtype, buckets ``[N, K]`` int32, scores ``[N, K]`` fp32).

    ``deterministic`` does not change the forward: it chooses the table gradient of its backward."""
    y, buckets, scores = empty_forward_outputs(x, tables)
    num_tables = tables.shape[0]
    num_hits = x.shape[0] * num_tables
    block_hits = hits_per_program(code_bits)
    hash_kernel[(triton.cdiv(num_hits, block_hits),)](
        x, buckets, scores, num_hits, num_tables, x.stride(0), x.stride(1), 2.0 / temperature,
        CODE_BITS=code_bits, TAU_PAD=triton.next_power_of_2(code_bits), SCALED=score == "scaled",
        BLOCK_HITS=block_hits, num_warps=HASH_WARPS,
    )  # fmt: skip
    gather(tables, bias, buckets, scores, y)
    return y, buckets, scores


def gather(
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    buckets: torch.Tensor,
    scores: torch.Tensor,
    y: torch.Tensor,
    kernel=tuned_gather,
    **config,
) -> None:
    """Write ``y [N, D]`` from the hashed hits: the autotuned gather, or ``kernel`` with an explicit ``config``
    (block sizes and ``num_warps``; the tests force each autotuning candidate this way)."""
    num_tokens, num_tables = buckets.shape
    _, num_rows, out_features = tables.shape

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(num_tokens, meta["BLOCK_N"]), triton.cdiv(out_features, meta["BLOCK_D"])

    kernel[grid](
        tables, bias, buckets, scores, y, num_tokens, num_rows, out_features, triton.next_power_of_2(num_tokens),
        NUM_TABLES=num_tables, HAS_BIAS=bias is not None, **config,
    )  # fmt: skip


@memory_layer_forward.register_fake
def _(x, tables, bias, code_bits, score, temperature, deterministic=True):
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


def row_pieces(buckets: torch.Tensor, num_rows: int, piece_hits: int) -> tuple[torch.Tensor, ...]:
    """The work lists of the deterministic table gradient, built on the device without a host sync.

    Returns ``sorted_hits`` (hit numbers ordered by table row, stable), ``pieces [P, 4]`` int64 (row,
    begin, end, slot) cutting each hit row's run of ``sorted_hits`` into pieces of at most ``piece_hits``
    (slot ``-1`` when one piece holds the row, else the piece's partial-sum slot), ``combines [M, 3]``
    int64 (row, first slot, slots) of the rows held by several pieces, and the number of partial-sum
    slots. ``P`` and ``M`` are upper bounds fixed by the shape (``min(rows, hits) + hits / piece_hits``
    and ``hits / (piece_hits + 1)``); the entries past the real ones have row ``-1`` and no work.
    """
    num_tables = buckets.shape[1]
    device = buckets.device
    num_hits, total_rows = buckets.numel(), num_tables * num_rows
    rows = (buckets + torch.arange(0, total_rows, num_rows, device=device, dtype=torch.int32)).view(-1)
    sorted_rows, sorted_hits = torch.sort(rows, stable=True)
    starts = torch.searchsorted(sorted_rows, torch.arange(total_rows + 1, device=device, dtype=torch.int32))
    counts = starts.diff()
    pieces_of_row = (counts + piece_hits - 1) // piece_hits
    pieces_through = pieces_of_row.cumsum(0)
    piece_numbers = torch.arange(min(total_rows, num_hits) + triton.cdiv(num_hits, piece_hits), device=device)
    piece_row = torch.searchsorted(pieces_through, piece_numbers, right=True)
    real = piece_row < total_rows
    row = piece_row.clamp(max=total_rows - 1)
    index_in_row = piece_numbers - (pieces_through[row] - pieces_of_row[row])
    begin = starts[row] + index_in_row * piece_hits
    end = torch.minimum(begin + piece_hits, starts[row + 1])
    several = pieces_of_row > 1
    row_slots = torch.where(several, pieces_of_row, 0)
    slots_through = row_slots.cumsum(0)
    first_slot = slots_through - row_slots
    slot = torch.where(several[row], first_slot[row] + index_in_row, -1)
    pieces = torch.stack(
        [
            torch.where(real, row, -1),
            torch.where(real, begin, 0),
            torch.where(real, end, 0),
            torch.where(real, slot, -1),
        ],
        dim=1,
    )
    max_split_rows = min(total_rows, num_hits // (piece_hits + 1))
    split_row = torch.searchsorted(several.cumsum(0), torch.arange(1, max_split_rows + 1, device=device))
    real = split_row < total_rows
    split_row_clamped = split_row.clamp(max=total_rows - 1)
    combines = torch.stack(
        [
            torch.where(real, split_row, -1),
            first_slot[split_row_clamped],
            torch.where(real, row_slots[split_row_clamped], 0),
        ],
        dim=1,
    )
    max_slots = num_hits // piece_hits + max_split_rows
    return sorted_hits, pieces.contiguous(), combines.contiguous(), max_slots


def sorted_backward(grad_y, x, tables, buckets, scores, code_bits, scaled, two_over_t) -> tuple[torch.Tensor, ...]:
    """Table gradient by pieces of the row segments of the hits sorted by row, then the input gradient from ``g_c``.

    One configuration per shape (no autotuning), so the bits depend on the inputs alone. Rows without
    hits get no program: the gradient starts from zeros.
    """
    _, num_rows, out_features = tables.shape
    num_tables = buckets.shape[1]
    sorted_hits, pieces, combines, max_slots = row_pieces(buckets, num_rows, PIECE_HITS)
    grad_tables = torch.zeros_like(tables)
    partials = torch.empty((max_slots, out_features), device=x.device, dtype=torch.float32)
    grad_scores = torch.empty(buckets.numel(), device=x.device, dtype=torch.float32)
    row_gradient_kernel[(pieces.shape[0],)](
        grad_y, tables, scores, sorted_hits, pieces, grad_tables, partials, grad_scores, num_tables, out_features,
        D_PAD=triton.next_power_of_2(out_features), BLOCK_HITS=row_tile_hits(out_features),
        num_warps=ROW_GRADIENT_WARPS,
    )  # fmt: skip
    if combines.shape[0]:
        combine_partials_kernel[(combines.shape[0], triton.cdiv(out_features, COMBINE_BLOCK_D))](
            partials, combines, grad_tables, out_features, BLOCK_D=COMBINE_BLOCK_D,
            num_warps=COMBINE_WARPS,
        )  # fmt: skip
    grad_x = x.new_empty(x.shape)
    block_hits = hits_per_program(code_bits)
    chunk_gradient_kernel[(triton.cdiv(buckets.numel(), block_hits),)](
        x, grad_scores, grad_x, buckets.numel(), num_tables, x.stride(0), x.stride(1), two_over_t,
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
    x, tables, bias, code_bits, score, temperature, deterministic = inputs
    _, buckets, scores = output
    ctx.save_for_backward(x, tables, buckets, scores)
    ctx.code_bits, ctx.score, ctx.temperature, ctx.deterministic = code_bits, score, temperature, deterministic
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(buckets, scores)


def backward(ctx, grad_y: torch.Tensor, _grad_buckets: None, _grad_scores: None) -> tuple:
    """Gradients of ``x``, ``tables`` and ``bias`` (the latter is ``grad_y`` summed over tokens)."""
    x, tables, buckets, scores = ctx.saved_tensors
    grad_x, grad_tables = memory_layer_backward(
        grad_y, x, tables, buckets, scores, ctx.code_bits, ctx.score, ctx.temperature, ctx.deterministic
    )
    grad_bias = None if ctx.bias_dtype is None else grad_y.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_tables, grad_bias, None, None, None, None


memory_layer_forward.register_autograd(backward, setup_context=setup_context)


def triton_memory_layer(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    code_bits: int,
    score: str,
    temperature: float,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[..., D]`` and int32 buckets ``[..., K]``, computed by the triton kernels.

    Same contract as :func:`mf_lightning.kernels.reference.reference_memory_layer`, plus the table gradient's
    mode (``deterministic``, else ``atomic_add``); the inputs were checked by
    :func:`mf_lightning.kernels.dispatch.check_inputs`.
    """
    bias = None if bias is None else bias.contiguous()
    y, buckets, _ = memory_layer_forward(
        x.reshape(-1, x.shape[-1]), tables.contiguous(), bias, code_bits, score, float(temperature), deterministic
    )
    return y.reshape(*x.shape[:-1], tables.shape[-1]), buckets.reshape(*x.shape[:-1], tables.shape[0])
