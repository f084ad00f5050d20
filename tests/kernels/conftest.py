"""Kernel tests' setup: optionally count the triton compilations these tests would trigger on a GPU.

With ``MF_COUNT_COMPILATIONS=<file>`` (set by ``benchmarks/gpu_suite.sh --rehearse``), every distinct
specialization of a triton kernel that the interpreted tests launch is recorded, as triton would key its
compilation cache: the kernel, the dtype of each tensor argument, for each runtime integer whether it is
1 or a multiple of 16, and the values of the keyword arguments (compile-time constants and warps; the
package passes every constant by keyword). An autotuned launch compiles every candidate on a GPU,
so it counts once per candidate of its list. At the end the count is written to ``<file>`` as JSON; the
GPU suite derives the time limit of its kernel-test step from it. Tests that only run on a GPU
(``requires_cuda``) are not counted here: the suite's fixed allowance covers them.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

COUNT_FILE = os.environ.get("MF_COUNT_COMPILATIONS")
TUNING_KEYS = {"BLOCK_N", "BLOCK_K", "BLOCK_D", "num_warps", "num_stages", "num_ctas", "maxnreg"}
"""Launch keywords an autotuning configuration sets: an autotuned kernel's candidates differ only in these."""


def specialization(value: object) -> object:
    """What of a runtime argument triton's compilation cache keys on."""
    if hasattr(value, "data_ptr"):
        return str(value.dtype)
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0)
    if isinstance(value, float):
        return "float"
    return repr(value)


@pytest.fixture(scope="session", autouse=True)
def count_compilations():
    """Record the kernel specializations launched during the session (only with ``MF_COUNT_COMPILATIONS``)."""
    if not COUNT_FILE:
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction

    from mf_lightning.kernels import triton_memory

    candidates = {
        "gather_kernel": len(triton_memory.GATHER_TUNING),
        "atomic_backward_kernel": len(triton_memory.ATOMIC_TUNING),
    }
    seen: set[tuple] = set()
    original_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        name = self.fn.__name__
        constants = tuple(
            sorted(
                (key, repr(value)) for key, value in kwargs.items() if name not in candidates or key not in TUNING_KEYS
            )
        )
        seen.add((name, tuple(map(specialization, args)), constants))
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original_run
        per_kernel: dict[str, int] = {}
        for name, _, _ in seen:
            per_kernel[name] = per_kernel.get(name, 0) + candidates.get(name, 1)
        report = {"compilations": sum(per_kernel.values()), "per_kernel": per_kernel}
        pathlib.Path(COUNT_FILE).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
