"""Every Memory Layer implementation usable on the device against the reference, in float32 and bfloat16.

Each case runs an implementation forward and backward (input, tables and bias take gradients) on odd
shapes (partial tiles, masked lanes) and on uniform and skewed bucket usage (a hot row is one long
segment of the triton backward), and compares it with the pure-PyTorch reference in float32
(:func:`mf_lightning.kernels.agreement.compare`). The fused CPU operator of decoding has no backward:
it is compared forward only, on as many tokens as it serves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mf_lightning.doctor.inputs import SKEWS, inputs_hashing_to, skewed_buckets
from mf_lightning.kernels import embedding_bag, fused_cpu, reference
from mf_lightning.kernels.agreement import QUANTITIES, Agreement, compare
from mf_lightning.kernels.dispatch import triton_importable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHAPES = ((37, 7, 5, 33), (300, 12, 8, 130))
"""(tokens, tables, code_bits, output width) of the cases: odd sizes, and several tiles of every kernel."""
QUICK_SHAPES = SHAPES[:1]
SCORE, TEMPERATURE = "scaled", 1.0


@dataclass(frozen=True)
class Implementation:
    """A Memory Layer implementation (contract: ``reference_memory_layer``) and whether it has a backward."""

    name: str
    function: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: bool = True
    max_tokens: int | None = None


@dataclass(frozen=True)
class Case:
    """One comparison: what ran, on what, and how far it was from the reference."""

    implementation: str
    dtype: str
    shape: tuple[int, int, int, int]
    skew: str
    agreement: Agreement


def implementations(device: torch.device) -> tuple[list[Implementation], list[str]]:
    """The implementations that run on ``device``, and a note for each backend that does not."""
    found = [Implementation("embedding_bag", embedding_bag.embedding_bag_memory_layer)]
    notes = []
    if device.type == "cpu":
        if fused_cpu.fused_cpu_available():
            found.append(Implementation("fused_cpu", fused_cpu.fused_cpu_memory_layer, False, fused_cpu.MAX_TOKENS))
        else:
            notes.append("fused_cpu: not built here (no C++ compiler); decoding runs the embedding_bag chain")
        notes.append("triton: not available on cpu (its kernels need a CUDA device)")
    elif triton_importable():
        from mf_lightning.kernels.triton_memory import triton_memory_layer

        for mode, deterministic in (("deterministic", True), ("atomic", False)):
            function = functools.partial(triton_memory_layer, deterministic=deterministic)
            found.append(Implementation(f"triton ({mode} backward)", function))
    else:
        notes.append("triton: not installed (pip install 'mf_lightning[triton]'); layers run embedding_bag")
    return found, notes


def case_inputs(
    shape: tuple[int, int, int, int], skew: str, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input hashing with the ``skew`` usage, tables and bias of ``shape``, in ``dtype`` on ``device``."""
    tokens, tables, code_bits, out_features = shape
    generator = torch.Generator().manual_seed(tokens * 31 + SKEWS.index(skew))
    x = inputs_hashing_to(skewed_buckets(skew, tokens, tables, code_bits, generator), code_bits, generator)
    table_values = 0.1 * torch.randn(tables, 2**code_bits, out_features, generator=generator)
    bias = 0.1 * torch.randn(out_features, generator=generator)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, table_values, bias))


def check_all(device: torch.device, quick: bool = False) -> tuple[list[Case], list[str]]:
    """Every implementation on every dtype, shape and skew against the reference; and the notes on what
    does not run here."""
    found, notes = implementations(device)
    cases = []
    for implementation in found:
        for dtype_name, dtype in DTYPES.items():
            for shape in QUICK_SHAPES if quick else SHAPES:
                for skew in SKEWS:
                    x, tables, bias = case_inputs(shape, skew, dtype, device)
                    if implementation.max_tokens:
                        x = x[: implementation.max_tokens]
                    agreement = compare(
                        implementation.function,
                        reference.reference_memory_layer,
                        (x, tables, bias),
                        (shape[2], SCORE, TEMPERATURE),
                        backward=implementation.backward,
                    )
                    cases.append(Case(implementation.name, dtype_name, (x.shape[0], *shape[1:]), skew, agreement))
    return cases, notes


def table_rows(cases: list[Case]) -> list[list[str]]:
    """Markdown rows: implementation, dtype, shape, inputs, the error of each quantity, pass/fail."""
    rows = []
    for case in cases:
        tokens, tables, code_bits, out_features = case.shape
        errors = case.agreement.errors
        cells = [f"{errors[q]:.1e}" if q in errors else "n/a" for q in QUANTITIES]
        verdict = "pass" if case.agreement.agrees else f"**FAIL** ({case.agreement.describe()})"
        shape = f"{tokens} x {tables}x{code_bits} bits -> {out_features}"
        rows.append([case.implementation, case.dtype, shape, case.skew, *cells, verdict])
    return rows
