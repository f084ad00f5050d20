"""``@triton.jit`` kernels of the Memory Layer: a fused forward and a fused backward.

Layout shared by both: inputs ``x [N, K*tau]`` (any strides), tables ``[K, R = 2**tau, D]`` contiguous,
per-chunk buckets ``[N, K]`` int32 and scores ``[N, K]`` float32 written by the forward and reused by
the backward so it never hashes again. All arithmetic is float32; chunks are padded to ``TAU_PAD``, the
next power of two of ``tau``, with masked lanes contributing nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_chunk(x_ptr, tokens, token_ok, k, stride_xn, stride_xw, CODE_BITS: tl.constexpr, TAU_PAD: tl.constexpr):
    """Chunk ``k`` of each token as float32 ``[BLOCK_N, TAU_PAD]`` (padding lanes are 0), and their mask."""
    bits = tl.arange(0, TAU_PAD)
    bit_ok = bits < CODE_BITS
    offsets = tokens.to(tl.int64)[:, None] * stride_xn + (k * CODE_BITS + bits)[None, :] * stride_xw
    z = tl.load(x_ptr + offsets, mask=token_ok[:, None] & bit_ok[None, :], other=0.0).to(tl.float32)
    return z, bit_ok


@triton.jit
def _log_probability(magnitude, bit_ok, two_over_t):
    """``sum_j logsigmoid(2|z_j|/t)`` per row: the log of the ``paper`` score (stable, as ``u >= 0``)."""
    log_sigmoid = -tl.log(1.0 + tl.exp(-magnitude * two_over_t))
    return tl.sum(tl.where(bit_ok[None, :], log_sigmoid, 0.0), axis=1)


@triton.jit
def memory_layer_forward_kernel(
    x_ptr,
    tables_ptr,
    bias_ptr,
    y_ptr,
    buckets_ptr,
    scores_ptr,
    num_tokens,
    num_tables,
    out_features,
    stride_xn,
    stride_xw,
    two_over_t,
    CODE_BITS: tl.constexpr,
    TAU_PAD: tl.constexpr,
    SCALED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``y[n, cols] = sum_k s_nk * T_k[h_nk, cols] + bias[cols]`` for one block of tokens and of columns.

    The programs of the first column block also write ``h_nk`` and ``s_nk`` for the backward.
    """
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    tokens = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < num_tokens
    col_ok = cols < out_features
    tile_ok = token_ok[:, None] & col_ok[None, :]
    bits = tl.arange(0, TAU_PAD)
    place_values = tl.where(bits < CODE_BITS, 1 << tl.where(bits < CODE_BITS, CODE_BITS - 1 - bits, 0), 0)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for k in range(num_tables):
        z, bit_ok = _load_chunk(x_ptr, tokens, token_ok, k, stride_xn, stride_xw, CODE_BITS, TAU_PAD)
        bucket = tl.sum(tl.where((z >= 0) & bit_ok[None, :], place_values[None, :], 0), axis=1)
        magnitude = tl.abs(z)
        score = tl.exp(_log_probability(magnitude, bit_ok, two_over_t))
        if SCALED:
            score = score * tl.sum(magnitude, axis=1)
        row_start = (k * (1 << CODE_BITS) + bucket).to(tl.int64) * out_features
        rows = tl.load(tables_ptr + row_start[:, None] + cols[None, :], mask=tile_ok, other=0.0)
        acc += score[:, None] * rows.to(tl.float32)
        if pid_d == 0:
            tl.store(buckets_ptr + tokens * num_tables + k, bucket.to(tl.int32), mask=token_ok)
            tl.store(scores_ptr + tokens * num_tables + k, score, mask=token_ok)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_offsets = tokens.to(tl.int64)[:, None] * out_features + cols[None, :]
    tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def memory_layer_backward_kernel(
    grad_y_ptr,
    x_ptr,
    tables_ptr,
    buckets_ptr,
    scores_ptr,
    grad_x_ptr,
    grad_tables_ptr,
    num_tokens,
    num_tables,
    out_features,
    stride_xn,
    stride_xw,
    two_over_t,
    CODE_BITS: tl.constexpr,
    TAU_PAD: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Gradients of one block of tokens through table ``k = program_id(1)``.

    Sweeping the hit rows once, it scatters ``s_nk * dy[n]`` into the float32 table gradient with
    atomic adds and reduces ``g_nk = <T_k[h_nk], dy[n]>``; then ``dx = g_nk * ds/dz`` for chunk ``k``
    (the bucket is piecewise constant, so the score is the only path back to ``x``). ``ds/dz_j`` is
    ``sgn(z_j) * ds/d|z_j|`` with ``sgn(0) = 0``, exactly as autograd differentiates ``abs``.
    """
    pid_n = tl.program_id(0)
    k = tl.program_id(1)
    tokens = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok = tokens < num_tokens
    bucket = tl.load(buckets_ptr + tokens * num_tables + k, mask=token_ok, other=0)
    score = tl.load(scores_ptr + tokens * num_tables + k, mask=token_ok, other=0.0)
    row_start = (k * (1 << CODE_BITS) + bucket).to(tl.int64) * out_features
    grad_y_start = tokens.to(tl.int64) * out_features
    grad_score = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for col_start in range(0, out_features, BLOCK_D):
        cols = col_start + tl.arange(0, BLOCK_D)
        tile_ok = token_ok[:, None] & (cols < out_features)[None, :]
        grad_y = tl.load(grad_y_ptr + grad_y_start[:, None] + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        rows = tl.load(tables_ptr + row_start[:, None] + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        grad_score += tl.sum(rows * grad_y, axis=1)
        tl.atomic_add(grad_tables_ptr + row_start[:, None] + cols[None, :], score[:, None] * grad_y, mask=tile_ok)

    z, bit_ok = _load_chunk(x_ptr, tokens, token_ok, k, stride_xn, stride_xw, CODE_BITS, TAU_PAD)
    magnitude = tl.abs(z)
    probability = tl.exp(_log_probability(magnitude, bit_ok, two_over_t))
    sigmoid_of_minus_u = 1.0 / (1.0 + tl.exp(magnitude * two_over_t))
    grad_of_log_probability = two_over_t * sigmoid_of_minus_u
    if SCALED:
        l1_norm = tl.sum(magnitude, axis=1)
        score_by_magnitude = probability[:, None] * (1.0 + l1_norm[:, None] * grad_of_log_probability)
    else:
        score_by_magnitude = probability[:, None] * grad_of_log_probability
    sign = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
    grad_x = grad_score[:, None] * score_by_magnitude * sign
    bits = tl.arange(0, TAU_PAD)
    grad_x_offsets = tokens.to(tl.int64)[:, None] * (num_tables * CODE_BITS) + (k * CODE_BITS + bits)[None, :]
    tl.store(
        grad_x_ptr + grad_x_offsets,
        grad_x.to(grad_x_ptr.dtype.element_ty),
        mask=token_ok[:, None] & bit_ok[None, :],
    )
