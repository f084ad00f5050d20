"""``@triton.jit`` kernels of the Memory Layer.

Layout: inputs ``x [N, K*tau]`` (any strides), tables ``[K, R = 2**tau, D]`` contiguous. A *hit* is one
(token, table) pair, numbered ``c = n * K + k``; its bucket ``h_c`` (int32) and score ``s_c`` (float32)
live at ``c`` of ``[N, K]`` buffers. Chunks are padded to ``TAU_PAD``, the next power of two of ``tau``,
with masked lanes contributing nothing. All arithmetic is float32.

Forward, two launches: :func:`hash_kernel` reads each chunk once and writes ``h_c, s_c``;
:func:`gather_kernel` sums ``s_c * T_k[h_c]`` over tables for a tile of tokens x columns. Splitting
them hashes every hit once, whatever the number of column tiles: the gather re-reads 8 bytes of
``h_c, s_c`` per column tile (from L2), against ``BLOCK_D`` table elements it gathers for that hit.

Backward, two modes:

- deterministic (default): the caller sorts the hits by table row and cuts each row's run of hits into
  pieces of at most a fixed number of hits; :func:`row_gradient_kernel` gives each piece one program
  that sums its hits' ``s_c * dy[n]`` in sorted order, writing the row itself when one piece holds it
  (zeros where no hit) and a float32 partial sum otherwise, and writes ``g_c = <T_k[h_c], dy[n]>`` for
  each of its hits, reading the table row once per piece instead of once per hit.
  :func:`combine_partials_kernel` adds the partial sums of each long row in piece order, and
  :func:`chunk_gradient_kernel` turns ``g_c`` into ``dx``. Work per program is bounded whatever the
  bucket distribution (a row holding every token no longer serialises the backward), and nothing
  depends on scheduling.
- atomic: :func:`atomic_backward_kernel` gathers rows per (token tile, table), reduces ``g_c`` and
  ``atomic_add`` s ``s_c * dy[n]`` into a float32 table gradient; fast when hits are spread, but
  atomics serialise on popular rows and the sum order depends on scheduling.

``ds/dz_j`` is ``sgn(z_j) * ds/d|z_j|`` with ``sgn(0) = 0``, exactly as autograd differentiates
``abs``; the bucket is piecewise constant, so the score is the only path back to ``x``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_chunks(x_ptr, hits, hit_ok, num_tables, stride_xn, stride_xw, CODE_BITS: tl.constexpr, TAU_PAD: tl.constexpr):
    """Chunks of hits ``[BLOCK]`` as float32 ``[BLOCK, TAU_PAD]`` (padding lanes 0), and the lane mask."""
    bits = tl.arange(0, TAU_PAD)
    bit_ok = bits < CODE_BITS
    tokens = hits // num_tables
    first = (hits % num_tables) * CODE_BITS
    offsets = tokens[:, None] * stride_xn + (first[:, None] + bits[None, :]) * stride_xw
    z = tl.load(x_ptr + offsets, mask=hit_ok[:, None] & bit_ok[None, :], other=0.0).to(tl.float32)
    return z, bit_ok


@triton.jit
def _log_probability(magnitude, bit_ok, two_over_t):
    """``sum_j logsigmoid(2|z_j|/t)`` per row: the log of the ``paper`` score (stable, as ``u >= 0``)."""
    log_sigmoid = -tl.log(1.0 + tl.exp(-magnitude * two_over_t))
    return tl.sum(tl.where(bit_ok[None, :], log_sigmoid, 0.0), axis=1)


@triton.jit
def _grad_of_chunks(z, bit_ok, grad_score, two_over_t, SCALED: tl.constexpr):
    """``dL/dz [BLOCK, TAU_PAD]`` of chunks ``z`` from ``dL/ds [BLOCK]``."""
    magnitude = tl.abs(z)
    probability = tl.exp(_log_probability(magnitude, bit_ok, two_over_t))
    grad_of_log_probability = two_over_t / (1.0 + tl.exp(magnitude * two_over_t))
    if SCALED:
        l1_norm = tl.sum(magnitude, axis=1)
        score_by_magnitude = probability[:, None] * (1.0 + l1_norm[:, None] * grad_of_log_probability)
    else:
        score_by_magnitude = probability[:, None] * grad_of_log_probability
    sign = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
    return grad_score[:, None] * score_by_magnitude * sign


@triton.jit
def _store_grad_x(grad_x_ptr, hits, hit_ok, bit_ok, grad_x, CODE_BITS: tl.constexpr, TAU_PAD: tl.constexpr):
    """Store ``dx`` of hits into the contiguous ``[N, K*tau]`` input gradient (hit ``c`` starts at ``c*tau``)."""
    offsets = hits[:, None] * CODE_BITS + tl.arange(0, TAU_PAD)[None, :]
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=hit_ok[:, None] & bit_ok[None, :])


@triton.jit
def hash_kernel(
    x_ptr,
    buckets_ptr,
    scores_ptr,
    num_hits,
    num_tables,
    stride_xn,
    stride_xw,
    two_over_t,
    CODE_BITS: tl.constexpr,
    TAU_PAD: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_HITS: tl.constexpr,
):
    """Bucket ``h_c`` (sign pattern, most significant bit first, ``z >= 0`` is 1) and score ``s_c`` of each hit."""
    hits = tl.program_id(0).to(tl.int64) * BLOCK_HITS + tl.arange(0, BLOCK_HITS)
    hit_ok = hits < num_hits
    z, bit_ok = _load_chunks(x_ptr, hits, hit_ok, num_tables, stride_xn, stride_xw, CODE_BITS, TAU_PAD)
    bits = tl.arange(0, TAU_PAD)
    place_values = tl.where(bit_ok, 1 << tl.where(bit_ok, CODE_BITS - 1 - bits, 0), 0)
    bucket = tl.sum(tl.where(z >= 0, place_values[None, :], 0), axis=1)
    magnitude = tl.abs(z)
    score = tl.exp(_log_probability(magnitude, bit_ok, two_over_t))
    if SCALED:
        score = score * tl.sum(magnitude, axis=1)
    tl.store(buckets_ptr + hits, bucket.to(tl.int32), mask=hit_ok)
    tl.store(scores_ptr + hits, score, mask=hit_ok)


@triton.jit
def gather_kernel(
    tables_ptr,
    bias_ptr,
    buckets_ptr,
    scores_ptr,
    y_ptr,
    num_tokens,
    num_rows,
    out_features,
    token_bucket,
    NUM_TABLES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``y[n, cols] = sum_k s_nk * T_k[h_nk, cols] + bias[cols]`` for one tile of tokens x columns.

    ``BLOCK_K`` tables are gathered per step (``BLOCK_N * BLOCK_K`` independent row loads in flight),
    but added to the accumulator one table at a time, in table order: every element is the same
    sequence of float32 operations whatever the block sizes and warps, so every autotuning candidate
    gives the same bits. ``NUM_TABLES`` is a compile-time constant so that the loop bounds are plain
    integers (triton 3.6's interpreter cannot iterate over a runtime scalar with numpy >= 2.4).
    ``token_bucket`` (a power of two >= ``num_tokens``) is unused here: it is the autotuning key, so
    nearby token counts share one tuned configuration.
    """
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < num_tokens
    col_ok = cols < out_features
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for first_table in range(0, NUM_TABLES, BLOCK_K):
        for offset in tl.static_range(BLOCK_K):
            table = tl.full((BLOCK_N,), first_table + offset, tl.int32)
            hit_ok = token_ok & (table < NUM_TABLES)
            hits = tokens * NUM_TABLES + table
            bucket = tl.load(buckets_ptr + hits, mask=hit_ok, other=0)
            score = tl.load(scores_ptr + hits, mask=hit_ok, other=0.0)
            row_start = (table * num_rows + bucket).to(tl.int64) * out_features
            rows = tl.load(
                tables_ptr + row_start[:, None] + cols[None, :], mask=hit_ok[:, None] & col_ok[None, :], other=0.0
            )
            acc = tl.where(hit_ok[:, None], acc + score[:, None] * rows.to(tl.float32), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_offsets = tokens[:, None] * out_features + cols[None, :]
    tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=token_ok[:, None] & col_ok[None, :])


@triton.jit
def row_gradient_kernel(
    grad_y_ptr,
    tables_ptr,
    scores_ptr,
    sorted_hits_ptr,
    pieces_ptr,
    grad_tables_ptr,
    partials_ptr,
    grad_scores_ptr,
    num_tables,
    out_features,
    D_PAD: tl.constexpr,
    BLOCK_HITS: tl.constexpr,
):
    """The table-gradient sum over one *piece* of a row's hits, and ``g_c`` of each of its hits, without atomics.

    ``sorted_hits`` lists the hits ordered by table row (stable). ``pieces [P, 4]`` (int64) cuts each
    row's run of hits into pieces of at most a fixed number of hits: (row, begin, end, slot), positions
    ``begin:end`` of ``sorted_hits``; row ``-1`` marks padding (no work). A row held by one piece is
    written to the table gradient directly (slot ``-1``; a row without hits gets zeros); the pieces of a
    longer row write float32 partial sums to ``partials[slot]``, which :func:`combine_partials_kernel`
    adds in slot order. So no program sums more than one piece, however the hits are spread over rows,
    and the sum runs in a fixed order, ``BLOCK_HITS`` hits per step: the result does not depend on
    scheduling. ``g_c = <T_k[h_c], dy[n]>`` reads the table row once per piece instead of once per hit.
    The loop is a ``while`` over loaded bounds (a ``range`` over runtime scalars fails in triton 3.6's
    interpreter with numpy >= 2.4).
    """
    piece = pieces_ptr + tl.program_id(0).to(tl.int64) * 4
    row = tl.load(piece)
    first = tl.load(piece + 1)
    end = tl.load(piece + 2)
    slot = tl.load(piece + 3)
    cols = tl.arange(0, D_PAD)
    col_ok = cols < out_features
    row_cols = col_ok & (tl.full((D_PAD,), row, tl.int64) >= 0)  # the scalar broadcast first: the interpreter
    slot_cols = col_ok & (tl.full((D_PAD,), slot, tl.int64) >= 0)  # mis-types ``block & scalar`` masks
    table_row = tl.load(tables_ptr + row * out_features + cols, mask=row_cols, other=0.0).to(tl.float32)
    acc = tl.zeros((D_PAD,), dtype=tl.float32)
    while first < end:
        positions = first + tl.arange(0, BLOCK_HITS)
        hit_ok = positions < end
        hits = tl.load(sorted_hits_ptr + positions, mask=hit_ok, other=0)
        score = tl.load(scores_ptr + hits, mask=hit_ok, other=0.0)
        grad_y_offsets = (hits // num_tables)[:, None] * out_features + cols[None, :]
        grad_y = tl.load(grad_y_ptr + grad_y_offsets, mask=hit_ok[:, None] & col_ok[None, :], other=0.0)
        grad_y = grad_y.to(tl.float32)
        acc += tl.sum(score[:, None] * grad_y, axis=0)
        tl.store(grad_scores_ptr + hits, tl.sum(grad_y * table_row[None, :], axis=1), mask=hit_ok)
        first += BLOCK_HITS
    grad_row = acc.to(grad_tables_ptr.dtype.element_ty)
    tl.store(grad_tables_ptr + row * out_features + cols, grad_row, mask=row_cols & ~slot_cols)
    tl.store(partials_ptr + slot * out_features + cols, acc, mask=slot_cols)


@triton.jit
def combine_partials_kernel(
    partials_ptr,
    combines_ptr,
    grad_tables_ptr,
    out_features,
    BLOCK_D: tl.constexpr,
):
    """Table-gradient columns of one row held by several pieces: its float32 partial sums added in slot order.

    ``combines [M, 3]`` (int64) holds (row, first slot, number of slots) per such row; row ``-1`` marks
    padding. The order is fixed, so the sum is deterministic; a program reads at most (hits of a row /
    hits per piece) partial rows of ``BLOCK_D`` columns.
    """
    combine = combines_ptr + tl.program_id(0).to(tl.int64) * 3
    row = tl.load(combine)
    slot = tl.load(combine + 1)
    last = slot + tl.load(combine + 2)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < out_features
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    while slot < last:
        acc += tl.load(partials_ptr + slot * out_features + cols, mask=col_ok, other=0.0)
        slot += 1
    row_cols = col_ok & (tl.full((BLOCK_D,), row, tl.int64) >= 0)
    tl.store(grad_tables_ptr + row * out_features + cols, acc.to(grad_tables_ptr.dtype.element_ty), mask=row_cols)


@triton.jit
def chunk_gradient_kernel(
    x_ptr,
    grad_scores_ptr,
    grad_x_ptr,
    num_hits,
    num_tables,
    stride_xn,
    stride_xw,
    two_over_t,
    CODE_BITS: tl.constexpr,
    TAU_PAD: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_HITS: tl.constexpr,
):
    """``dx`` of each hit's chunk from ``g_c = dL/ds_c``."""
    hits = tl.program_id(0).to(tl.int64) * BLOCK_HITS + tl.arange(0, BLOCK_HITS)
    hit_ok = hits < num_hits
    z, bit_ok = _load_chunks(x_ptr, hits, hit_ok, num_tables, stride_xn, stride_xw, CODE_BITS, TAU_PAD)
    grad_score = tl.load(grad_scores_ptr + hits, mask=hit_ok, other=0.0)
    grad_x = _grad_of_chunks(z, bit_ok, grad_score, two_over_t, SCALED)
    _store_grad_x(grad_x_ptr, hits, hit_ok, bit_ok, grad_x, CODE_BITS, TAU_PAD)


@triton.jit
def atomic_backward_kernel(
    grad_y_ptr,
    x_ptr,
    tables_ptr,
    buckets_ptr,
    scores_ptr,
    grad_x_ptr,
    grad_tables_ptr,
    num_tokens,
    num_tables,
    num_rows,
    out_features,
    stride_xn,
    stride_xw,
    two_over_t,
    token_bucket,
    CODE_BITS: tl.constexpr,
    TAU_PAD: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Gradients of one tile of tokens through table ``k = program_id(1)``, table rows by ``atomic_add``.

    Sweeping the hit rows once, it scatters ``s_c * dy[n]`` into the float32 table gradient and reduces
    ``g_c``; then ``dx`` of chunk ``k``. ``token_bucket`` is the autotuning key (see :func:`gather_kernel`).
    """
    k = tl.program_id(1)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok = tokens < num_tokens
    hits = tokens * num_tables + k
    bucket = tl.load(buckets_ptr + hits, mask=token_ok, other=0)
    score = tl.load(scores_ptr + hits, mask=token_ok, other=0.0)
    row_start = (k * num_rows + bucket).to(tl.int64) * out_features
    grad_y_start = tokens * out_features
    grad_score = tl.zeros((BLOCK_N,), dtype=tl.float32)
    col_start = tl.zeros((), dtype=tl.int32)
    while col_start < out_features:
        cols = col_start + tl.arange(0, BLOCK_D)
        tile_ok = token_ok[:, None] & (cols < out_features)[None, :]
        grad_y = tl.load(grad_y_ptr + grad_y_start[:, None] + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        rows = tl.load(tables_ptr + row_start[:, None] + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        grad_score += tl.sum(rows * grad_y, axis=1)
        tl.atomic_add(grad_tables_ptr + row_start[:, None] + cols[None, :], score[:, None] * grad_y, mask=tile_ok)
        col_start += BLOCK_D
    z, bit_ok = _load_chunks(x_ptr, hits, token_ok, num_tables, stride_xn, stride_xw, CODE_BITS, TAU_PAD)
    grad_x = _grad_of_chunks(z, bit_ok, grad_score, two_over_t, SCALED)
    _store_grad_x(grad_x_ptr, hits, token_ok, bit_ok, grad_x, CODE_BITS, TAU_PAD)
