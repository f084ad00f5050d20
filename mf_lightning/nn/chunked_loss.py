"""LM head + cross-entropy computed a chunk of tokens at a time, so ``[tokens, vocab]`` logits never exist.

The plain path materialises the logits, an fp32 copy, the log-softmax kept for backward and their
gradients: several ``[tokens, vocab]`` fp32 tensors, which at 131k tokens x 50k vocabulary are tens of GB.
Here each chunk's logits are formed in fp32, reduced to the chunk's loss, turned in place into the
gradient of the loss w.r.t. those logits (softmax minus one-hot) and at once contracted into the chunk's
gradient of the hidden states and of the head weight; then they are dropped. The forward therefore does
the backward's matmuls too (three per chunk, as the plain path has in total), and the backward only
scales the stored gradients. Extra memory: one chunk's logits (one ``[chunk, vocab]`` fp32 buffer, its
softmax and gradient are formed in place) plus the gradients of the hidden states and of the head weight. Without grad (evaluation) only
the loss is computed.
"""

from __future__ import annotations

import torch

from mf_lightning.checks import positive_int


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, ``chunk_size`` tokens at a time.

    Equals ``F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index)``
    and its gradients w.r.t. ``hidden [N, d]`` and ``weight [V, d]``. Under autocast the matmuls run in
    the autocast dtype and the softmax, loss and the head weight's gradient accumulate in fp32.
    """
    positive_int("chunk_size", chunk_size)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index)
    loss, _, _ = loss_and_gradients(hidden, weight, targets, chunk_size, ignore_index, with_gradients=False)
    return loss


class LinearCrossEntropy(torch.autograd.Function):
    """Autograd wrapper of :func:`loss_and_gradients`: gradients come from the forward, scaled in backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        ignore_index: int,
    ) -> torch.Tensor:
        loss, grad_hidden, grad_weight = loss_and_gradients(
            hidden, weight, targets, chunk_size, ignore_index, with_gradients=True
        )
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        return (
            grad_hidden * grad_loss if needs_hidden else None,
            grad_weight * grad_loss if needs_weight else None,
            None,
            None,
            None,
        )


def loss_and_gradients(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    ignore_index: int,
    with_gradients: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss and, ``with_gradients``, its gradients w.r.t. ``hidden`` (its dtype) and ``weight`` (fp32)."""
    valid = targets != ignore_index
    count = valid.sum()
    safe_targets = torch.where(valid, targets, 0).unsqueeze(1)
    loss = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if with_gradients else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_gradients else None
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        chunk = hidden[rows]
        logits = (chunk @ weight.T).float()
        target_logits = logits.gather(1, safe_targets[rows])
        maxima = logits.amax(dim=1, keepdim=True)
        probabilities = logits.sub_(maxima).exp_()
        sums = probabilities.sum(dim=1, keepdim=True)
        loss = loss + ((maxima + sums.log() - target_logits).squeeze(1) * valid[rows]).sum()
        if with_gradients:
            grad_logits = probabilities.div_(sums)
            grad_logits.scatter_add_(1, safe_targets[rows], torch.full_like(target_logits, -1.0))
            grad_logits = grad_logits.mul_((valid[rows] / count).unsqueeze(1)).to(weight.dtype)
            grad_hidden[rows] = grad_logits @ weight
            grad_weight += grad_logits.T @ chunk
    return loss / count, grad_hidden, grad_weight
