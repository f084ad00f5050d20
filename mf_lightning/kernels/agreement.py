"""How far one Memory Layer implementation is from another: the output, the buckets and every gradient.

The one comparison of implementations: the first-call check of the triton kernels
(:mod:`mf_lightning.kernels.guard`) and ``mf doctor`` both use it. The expected side runs in float32 on
the same values (a bfloat16 input is exactly representable in float32), so an error is the rounding of the
implementation under test, judged against :func:`tolerance` for its dtype; buckets must be identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

MemoryLayerFunction = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""The contract of :func:`mf_lightning.kernels.reference.reference_memory_layer`."""
QUANTITIES = ("output", "buckets", "grad x", "grad tables", "grad bias")
ROUNDING_MARGIN = 4
"""How many times the expected rounding error of a sum an implementation may be off by."""


def tolerance(dtype: torch.dtype, terms: int) -> float:
    """Largest error, relative to the expected tensor's largest magnitude, that agrees for sums of at most
    ``terms`` values in ``dtype``: ``ROUNDING_MARGIN`` times a random walk of unit roundoffs, ``u sqrt(n)``
    (float32, 67 terms: 2e-6; bfloat16, 300 terms: 0.27). A wrong row, token or scale is off by far more.
    """
    return ROUNDING_MARGIN * torch.finfo(dtype).eps / 2 * math.sqrt(terms)


@dataclass(frozen=True)
class Agreement:
    """The error of each compared quantity (relative to the expected tensor's largest magnitude; for buckets
    the fraction that differ) and the dtype's tolerance."""

    errors: dict[str, float]
    tolerance: float

    def limit(self, quantity: str) -> float:
        return 0.0 if quantity == "buckets" else self.tolerance

    @property
    def agrees(self) -> bool:
        return all(error <= self.limit(quantity) for quantity, error in self.errors.items())

    def excess(self, quantity: str) -> float:
        """The error over its limit: above 1 disagrees."""
        limit, error = self.limit(quantity), self.errors[quantity]
        return error / limit if limit else (float("inf") if error else 0.0)

    @property
    def worst(self) -> str:
        """The quantity furthest over (or nearest to) its limit."""
        return max(self.errors, key=self.excess)

    def describe(self) -> str:
        """``worst grad tables error 3.1e-01 (tolerance 1e-05)``, or ``buckets differ in 2.0%``."""
        if self.worst == "buckets" and self.errors["buckets"]:
            return f"buckets differ in {100 * self.errors['buckets']:.1f}% of the hits"
        return f"worst {self.worst} error {self.errors[self.worst]:.1e} (tolerance {self.tolerance:.0e})"


def outputs_and_gradients(
    function: MemoryLayerFunction,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    layer: tuple[int, str, float],
    grad_y: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Output and buckets of ``function(x, tables, bias, code_bits, score, temperature)`` and, given the
    upstream gradient ``grad_y``, the gradients of ``x``, ``tables`` and ``bias`` (fresh leaves; autograd on
    even inside ``inference_mode``)."""
    backward = grad_y is not None
    with torch.inference_mode(False), torch.set_grad_enabled(backward):
        leaves = [None if t is None else t.detach().clone().requires_grad_(backward) for t in inputs]
        y, buckets = function(*leaves, *layer)
        found = {"output": y.detach(), "buckets": buckets.long()}
        if backward:
            wanting = [leaf for leaf in leaves if leaf is not None]
            names = ("grad x", "grad tables", "grad bias")[: len(wanting)]
            found.update(zip(names, torch.autograd.grad(y, wanting, grad_y.to(y.dtype))))
    return found


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude of ``expected`` (non-finite: infinite)."""
    difference = (found.float() - expected.float()).abs().max()
    if not torch.isfinite(difference):
        return float("inf")
    return float(difference / expected.float().abs().max().clamp_min(torch.finfo(torch.float32).tiny))


def compare(
    function: MemoryLayerFunction,
    expected_function: MemoryLayerFunction,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    layer: tuple[int, str, float],
    backward: bool = True,
) -> Agreement:
    """``function`` on ``inputs`` against ``expected_function`` on the same values in float32, forward and
    (with ``backward``) every gradient for one random upstream gradient; ``layer`` is (code_bits, score,
    temperature). The longest sum is over the tokens (a table row's gradient), the tables (an output) or
    the output width (an input gradient)."""
    upcast = tuple(None if t is None else t.detach().float() for t in inputs)
    grad_y = None
    if backward:
        out_features = inputs[1].shape[-1]
        grad_y = torch.randn(*inputs[0].shape[:-1], out_features, device=inputs[0].device)
    expected = outputs_and_gradients(expected_function, upcast, layer, grad_y)
    found = outputs_and_gradients(function, inputs, layer, grad_y)
    errors = {
        quantity: (
            float((found[quantity] != expected[quantity]).float().mean())
            if quantity == "buckets"
            else relative_error(found[quantity], expected[quantity])
        )
        for quantity in QUANTITIES
        if quantity in expected
    }
    num_tables, _, out_features = inputs[1].shape
    terms = max(inputs[0].numel() // inputs[0].shape[-1], num_tables, out_features)
    return Agreement(errors, tolerance(inputs[1].dtype, terms))
