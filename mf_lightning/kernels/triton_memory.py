"""Triton Memory Layer: fused forward and backward kernels registered as ``torch.library`` ops.

``mf_lightning::memory_layer_forward`` hashes, scores and accumulates in one kernel and also returns
the buckets and scores; ``mf_lightning::memory_layer_backward`` reuses them to produce the input and the
dense table gradients in one kernel. Both are ``custom_op`` s with a fake (shape) function, and the
forward carries an autograd formula, so ``torch.compile`` traces the layer without graph breaks.
(``triton_op`` would let inductor see inside, but under ``TRITON_INTERPRET=1`` its generated fake
function launches the interpreter on fake tensors, so neither ``opcheck`` nor the CPU tests could run.)
:func:`memory_layer` is the functional entry point with the contract of
:func:`mf_lightning.kernels.reference.memory_layer`.
"""

from __future__ import annotations

import torch
import triton

from mf_lightning.kernels.dispatch import check_shapes
from mf_lightning.kernels.hashing import SCORES
from mf_lightning.kernels.triton_kernels import memory_layer_backward_kernel, memory_layer_forward_kernel

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK_N = 32
MAX_BLOCK_D = 128


def block_sizes(num_tokens: int, out_features: int) -> tuple[int, int]:
    """Tokens and output columns handled by one program: powers of two, no larger than needed."""
    return (
        min(MAX_BLOCK_N, triton.next_power_of_2(max(num_tokens, 1))),
        min(MAX_BLOCK_D, triton.next_power_of_2(out_features)),
    )


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
    num_tables, _, out_features = tables.shape
    y, buckets, scores = empty_forward_outputs(x, tables)
    block_n, block_d = block_sizes(num_tokens, out_features)
    grid = (triton.cdiv(num_tokens, block_n), triton.cdiv(out_features, block_d))
    memory_layer_forward_kernel[grid](
        x, tables, bias, y, buckets, scores,
        num_tokens, num_tables, out_features, x.stride(0), x.stride(1), 2.0 / temperature,
        CODE_BITS=code_bits, TAU_PAD=triton.next_power_of_2(code_bits), SCALED=score == "scaled",
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_D=block_d,
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``grad_x`` like ``x`` but contiguous, dense contiguous ``grad_tables`` like ``tables``) from ``grad_y [N, D]``.

    The table gradient is accumulated in float32 (fp16/bf16 atomics are slow or missing) and cast last.
    """
    grad_y = grad_y.contiguous()
    num_tokens = x.shape[0]
    num_tables, _, out_features = tables.shape
    grad_x = x.new_empty(x.shape)
    grad_tables = torch.zeros(tables.shape, device=tables.device, dtype=torch.float32)
    block_n, block_d = block_sizes(num_tokens, out_features)
    grid = (triton.cdiv(num_tokens, block_n), num_tables)
    memory_layer_backward_kernel[grid](
        grad_y, x, tables, buckets, scores, grad_x, grad_tables,
        num_tokens, num_tables, out_features, x.stride(0), x.stride(1), 2.0 / temperature,
        CODE_BITS=code_bits, TAU_PAD=triton.next_power_of_2(code_bits), SCALED=score == "scaled",
        BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return grad_x, grad_tables.to(tables.dtype)


@memory_layer_backward.register_fake
def _(grad_y, x, tables, buckets, scores, code_bits, score, temperature):
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
    grad_x, grad_tables = memory_layer_backward(
        grad_y, x, tables, buckets, scores, ctx.code_bits, ctx.score, ctx.temperature
    )
    grad_bias = None if ctx.bias_dtype is None else grad_y.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_tables, grad_bias, None, None, None


memory_layer_forward.register_autograd(backward, setup_context=setup_context)


def check_inputs(x: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None, code_bits: int, score: str) -> None:
    """Reject inputs the kernels cannot take with a message naming the value and what is valid."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    for name, tensor in (("x", x), ("tables", tables), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"the triton Memory Layer supports {', '.join(map(str, SUPPORTED_DTYPES))}; {name} has dtype "
                f"{tensor.dtype} (use backend='torch' or 'embedding_bag' for it)"
            )
        if tensor.device != tables.device:
            raise ValueError(f"{name} is on {tensor.device} but the tables are on {tables.device}")
    if check_shapes(x, tables, bias) != code_bits:
        raise ValueError(f"code_bits={code_bits} needs tables [K, {2**code_bits}, out], got {tuple(tables.shape)}")

def memory_layer(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    code_bits: int,
    score: str,
    temperature: float,
    buckets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as :func:`mf_lightning.kernels.reference.memory_layer`, computed by the triton kernels.

    ``buckets`` is accepted for that contract and not needed: the fused kernel hashes as it gathers.
    """
    check_inputs(x, tables, bias, code_bits, score)
    bias = None if bias is None else bias.contiguous()
    y, _, _ = memory_layer_forward(
        x.reshape(-1, x.shape[-1]), tables.contiguous(), bias, code_bits, score, float(temperature)
    )
    return y.reshape(*x.shape[:-1], tables.shape[-1])
