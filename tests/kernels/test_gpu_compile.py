"""Every triton kernel variant compiles for real GPUs (sm_90, sm_80) on this CPU-only machine, without spills.

``mf_lightning.kernels.gpu_compile`` runs triton's compiler with a ``GPUTarget`` down to a cubin and reads
``cuobjdump -res-usage``; it runs in a subprocess because the test session interprets the kernels
(``TRITON_INTERPRET=1``), and interpreted kernels cannot be compiled. The registers, shared memory and
spills of every variant are printed here and committed in ``benchmarks/results/kernel_resources.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mf_lightning.kernels.gpu_compile import tool

pytestmark = pytest.mark.skipif(
    not (tool("ptxas").is_file() and tool("cuobjdump").is_file()),
    reason=f"this triton wheel ships no ptxas/cuobjdump under {tool('').parent}: nothing to compile for a GPU with",
)


def compile_rows(*args: str) -> list[dict]:
    """Rows of ``gpu_compile --json`` run without the interpreter; the table is printed for the test log."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mf_lightning.kernels.gpu_compile", "--json", *args],
        capture_output=True, text=True, env=env, timeout=1500,
    )  # fmt: skip
    assert done.stdout.strip(), f"gpu_compile failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
    rows = json.loads(done.stdout)
    for row in rows:
        name = f"sm_{row['arch']} {row['kernel']} [{row['variant']}] warps={row['warps']}"
        print(
            f"{name}: {row['REG']} registers, {row['SHARED']} B shared, {row['LOCAL']} B local, {row['STACK']} B stack"
        )
    return rows


def assert_no_spills(rows: list[dict]) -> None:
    spilling = [f"sm_{r['arch']} {r['kernel']} [{r['variant']}] warps={r['warps']}" for r in rows if r["spills"]]
    assert not spilling, "variants spilling registers to local memory:\n" + "\n".join(spilling)


def test_one_variant_of_each_kernel_and_dtype_compiles_for_sm90_without_spills() -> None:
    rows = compile_rows("--arch", "90", "--covering")
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"hash_kernel", "gather_kernel", "row_gradient_kernel", "combine_partials_kernel",
                       "chunk_gradient_kernel", "atomic_backward_kernel"}  # fmt: skip
    assert all(0 < row["REG"] <= 255 for row in rows)
    assert_no_spills(rows)


@pytest.mark.slow
def test_every_variant_compiles_for_sm90_and_sm80_without_spills() -> None:
    """The full product: dtypes, code-length families, scores, backward modes and autotuning configs."""
    rows = compile_rows("--arch", "90", "80")
    assert {row["arch"] for row in rows} == {90, 80}
    assert_no_spills(rows)
