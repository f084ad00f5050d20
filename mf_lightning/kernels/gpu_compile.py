"""Ahead-of-time GPU compilation of every triton kernel variant the package launches, with resource usage.

Needs no GPU: ``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32))``
runs triton's own compiler down to a cubin with the ``ptxas`` its wheel ships, and that wheel's
``cuobjdump -res-usage`` reports registers, shared memory and local memory (spills) per kernel. A
kernel that would not compile for the GPU, or that spills, is caught on any machine.

Variants are every combination the launches in :mod:`triton_memory` can produce: each kernel, with each
autotuning configuration, for each dtype its pointers can carry, each code-length family (``tau = 8``,
a power of two, and ``tau = 10``, padded to 16), each score, and both backward modes (the row-gradient,
combine and chunk-gradient kernels are the deterministic mode, the atomic kernel the other). The
deterministic kernels have one configuration per shape; the gather and atomic kernels one per
autotuning candidate.

    TRITON_INTERPRET=0 python -m mf_lightning.kernels.gpu_compile --arch 90 80

prints a markdown table and exits 1 if any variant spills; ``--json`` prints the rows for tests.
It must run without ``TRITON_INTERPRET=1`` (under the interpreter the kernels are not compilable objects).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import mf_lightning.kernels.triton_kernels as triton_kernels
import mf_lightning.kernels.triton_memory as triton_memory

TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
CODE_BITS = (8, 10)
SCORES = ("scaled", "paper")
OUT_FEATURES = (1024, 4096)
"""Output widths of the row-gradient variants: the model widths and fused QKV (``3 * 1024``, padded)."""
NUM_TABLES = 128
"""Tables of the gather variants (a 1024-wide input in 8-bit chunks); it bounds a loop, not a register tile."""
MIXED = [("bfloat16", "float32"), ("float16", "float32")]
"""(input, tables) dtypes of autocast training: half-precision activations, float32 tables."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compilation: a kernel, its argument types, its compile-time constants and warps."""

    kernel: str
    signature: dict[str, str]
    constants: dict[str, object]
    num_warps: int

    @property
    def label(self) -> str:
        dtypes = "/".join(dict.fromkeys(t[1:] for t in self.signature.values() if t.startswith("*f") or t == "*bf16"))
        return f"{dtypes} " + " ".join(f"{k}={v}" for k, v in self.constants.items())


def signature(kernel: str, pointers: dict[str, str], constants: dict[str, object]) -> dict[str, str]:
    """Triton types of every argument of ``kernel``: the given pointer types, int32 for other runtime
    integers (``two_over_t`` is float32) and ``constexpr`` for the constants."""
    fn = getattr(triton_kernels, kernel)
    types = {}
    for name in fn.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = pointers[name]
        else:
            types[name] = "fp32" if name == "two_over_t" else "i32"
    return types


def variant(kernel: str, pointers: dict[str, str], constants: dict[str, object], num_warps: int) -> Variant:
    return Variant(kernel, signature(kernel, pointers, constants), constants, num_warps)


def hashing_constants(code_bits: int, score: str) -> dict[str, object]:
    tau_pad = triton.next_power_of_2(code_bits)
    return {
        "CODE_BITS": code_bits,
        "TAU_PAD": tau_pad,
        "SCALED": score == "scaled",
        "BLOCK_HITS": triton_memory.hits_per_program(code_bits),
    }


def variants() -> list[Variant]:
    """Every variant the package can launch (see the module docstring)."""
    same = [(dtype, dtype) for dtype in TYPES]
    found = []
    for x_dtype, code_bits, score in itertools.product(TYPES, CODE_BITS, SCORES):
        x = f"*{TYPES[x_dtype]}"
        constants = hashing_constants(code_bits, score)
        found.append(
            variant(
                "hash_kernel",
                {"x_ptr": x, "buckets_ptr": "*i32", "scores_ptr": "*fp32"},
                constants,
                triton_memory.HASH_WARPS,
            )
        )
        found.append(
            variant(
                "chunk_gradient_kernel",
                {"x_ptr": x, "grad_scores_ptr": "*fp32", "grad_x_ptr": x},
                constants,
                triton_memory.HASH_WARPS,
            )
        )
    for table_dtype, (blocks, warps) in itertools.product(TYPES, triton_memory.GATHER_TUNING):
        t = f"*{TYPES[table_dtype]}"
        pointers = {"tables_ptr": t, "bias_ptr": t, "buckets_ptr": "*i32", "scores_ptr": "*fp32", "y_ptr": t}
        constants = {"NUM_TABLES": NUM_TABLES, "HAS_BIAS": True, **blocks}
        found.append(variant("gather_kernel", pointers, constants, warps))
    for table_dtype, out_features in itertools.product(TYPES, OUT_FEATURES):
        t = f"*{TYPES[table_dtype]}"
        pointers = {"grad_y_ptr": t, "tables_ptr": t, "scores_ptr": "*fp32", "sorted_hits_ptr": "*i64",
                    "pieces_ptr": "*i64", "grad_tables_ptr": t, "partials_ptr": "*fp32",
                    "grad_scores_ptr": "*fp32"}  # fmt: skip
        constants = {"D_PAD": out_features, "BLOCK_HITS": triton_memory.row_tile_hits(out_features)}
        found.append(variant("row_gradient_kernel", pointers, constants, triton_memory.ROW_GRADIENT_WARPS))
    for table_dtype in TYPES:
        pointers = {"partials_ptr": "*fp32", "combines_ptr": "*i64", "grad_tables_ptr": f"*{TYPES[table_dtype]}"}
        constants = {"BLOCK_D": triton_memory.COMBINE_BLOCK_D}
        found.append(variant("combine_partials_kernel", pointers, constants, triton_memory.COMBINE_WARPS))
    for (x_dtype, table_dtype), code_bits, score, (blocks, warps) in itertools.product(
        same + MIXED, CODE_BITS, SCORES, triton_memory.ATOMIC_TUNING
    ):
        x, t = f"*{TYPES[x_dtype]}", f"*{TYPES[table_dtype]}"
        pointers = {"grad_y_ptr": t, "x_ptr": x, "tables_ptr": t, "buckets_ptr": "*i32", "scores_ptr": "*fp32",
                    "grad_x_ptr": x, "grad_tables_ptr": "*fp32"}  # fmt: skip
        constants = {**hashing_constants(code_bits, score), **blocks}
        del constants["BLOCK_HITS"]
        found.append(variant("atomic_backward_kernel", pointers, constants, warps))
    return found


def covering(found: list[Variant]) -> list[Variant]:
    """One variant per kernel and argument types: the last listed, which has the padded code length, the
    widest row gradient and the autotuning configuration that uses the most registers."""
    return list({(item.kernel, tuple(item.signature.values())): item for item in found}.values())


def tool(name: str) -> pathlib.Path:
    """A CUDA binary that ships in the triton wheel (``ptxas``, ``cuobjdump``)."""
    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``SHARED``, ``LOCAL`` and ``STACK`` bytes of the one function in ``cubin`` (cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        command = [tool("cuobjdump"), "-res-usage", file.name]
        report = subprocess.run(command, capture_output=True, text=True, check=True)
    line = next(line for line in report.stdout.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", line)}


def compile_variant(item: Variant, arch: int) -> dict[str, object]:
    """Compile one variant for ``sm_<arch>`` and return its resource usage, with ``spills`` true on local memory."""
    fn = getattr(triton_kernels, item.kernel)
    compiled = triton.compile(
        ASTSource(fn, item.signature, item.constants),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": item.num_warps},
    )
    usage = resource_usage(compiled.asm["cubin"])
    spills = usage["LOCAL"] > 0 or usage["STACK"] > 0
    row = {"arch": arch, "kernel": item.kernel, "variant": item.label, "warps": item.num_warps}
    return {**row, **usage, "spills": spills}


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| sm | kernel | variant | warps | registers | shared B | local B | stack B | spills |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['arch']} | {row['kernel']} | {row['variant']} | {row['warps']} | {row['REG']} | "
            f"{row['SHARED']} | {row['LOCAL']} | {row['STACK']} | {'SPILLS' if row['spills'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities, e.g. 90 80")
    parser.add_argument("--kernels", nargs="+", default=None, help="only these kernels (default: all)")
    parser.add_argument("--covering", action="store_true", help="one variant per kernel and argument types")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of markdown")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compilations in parallel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled for a GPU")
    missing = [name for name in ("ptxas", "cuobjdump") if not tool(name).is_file()]
    if missing:
        parser.error(f"the triton wheel has no {', '.join(missing)} under {tool('').parent}")
    chosen = [item for item in variants() if args.kernels is None or item.kernel in args.kernels]
    chosen = covering(chosen) if args.covering else chosen
    jobs = [(item, arch) for arch in args.arch for item in chosen]
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(compile_variant, *zip(*jobs)))
    if args.json:
        print(json.dumps(rows))
    else:
        given = sys.argv[1:] if argv is None else argv
        command = shlex.join(["python", "-m", "mf_lightning.kernels.gpu_compile", *given])
        print(f"# Triton kernel resources, compiled ahead of time (no GPU)\n\n- triton {triton.__version__}, "
              f"date {datetime.date.today().isoformat()}, command: `{command}`\n- registers, shared memory, "
              "local memory and stack per variant from `cuobjdump -res-usage`; a non-zero stack or local size "
              f"is a spill\n\n{markdown(rows)}")  # fmt: skip
    return 1 if any(row["spills"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
