#!/usr/bin/env bash
# The GPU suite: proves the GPU path of mf_lightning on one NVIDIA GPU (H100/H200) in <= 8 minutes, offline.
#
#   bash benchmarks/gpu_suite.sh              # run every step, tables under benchmarks/results/ naming the GPU
#   bash benchmarks/gpu_suite.sh --dry-run    # list the steps and their commands, run nothing
#   bash benchmarks/gpu_suite.sh --rehearse   # every step on this CPU, in a fresh venv of the GPU image's packages
#
# Needs python3 with torch, triton and lightning (and torchmetrics, tensorboard, tokenizers, safetensors,
# rich, numpy, pytest): the GPU image has them (torch 2.11, triton 3.6, lightning 2.6.6). What it lacks
# travels as wheels in .whl/ at the repository root (ignored by git, never committed): jsonargparse and its
# signature extras, xxhash (the checkpoint digests), and ninja (torch's C++ extension builder runs it for the fused CPU decoding operator,
# which tests/kernels builds). Fetch them on a machine with pip access:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl $CARRIED_WHEELS
# (the list is CARRIED_WHEELS below) and carry .whl with the checkout (the device tool: carry=[".whl"]).
# Steps, each under a time limit (see LIMITS):
#   1. install: the wheels into $SITE, then `pip install --no-deps -e .` (never touches torch);
#   2. mf doctor --device cuda: what a user runs (mf_lightning/doctor/, whose measurement code the benchmarks
#      below share): every backend against the reference, Memory Layer vs nn.Linear at the preset widths,
#      a short training of both models, the compiled decoding step, one verdict; report doctor_gpu.md;
#   3. MF_TEST_CUDA=1 pytest tests/kernels: compiled kernels, fp32/bf16/fp16, both backward modes, hot rows,
#      every gather candidate bitwise equal, torch.compile(fullgraph=True), AOT compile for sm_90, no spills;
#   4. benchmarks/memory_layer.py --device cuda: triton (both backward modes), embedding_bag and nn.Linear,
#      bf16, width 1024, 1..16384 tokens, forward and forward+backward, bandwidth vs the device's peak, and
#      the skewed-input table (uniform, Gini 0.93, one hot row) at 16384 tokens;
#   5. benchmarks/gpu_train.py: 40 steps of mf fit, memoryformer_tiny and transformer_tiny, bf16-mixed,
#      with and without model.compile: tokens/s, step time, peak GPU memory.
# Every step runs even if an earlier one failed; the exit status is 1 if any failed. On the GPU each step
# compiles into its own fresh triton cache, and the number of kernels it compiled is printed after it.
#
# --rehearse makes a fresh virtual environment holding only the image's packages (IMAGE_PACKAGES: CPU torch
# 2.13 stands in for 2.11, which has no CPU build here) plus the carried wheels (from .whl/, or downloaded
# into a temporary folder when .whl/ has none), and runs the same four steps on the CPU: kernels under
# triton's interpreter (all of tests/kernels, the slow AOT compile for sm_80 and sm_90 included), mf doctor
# --quick on the CPU, tiny
# shapes, a few training steps (on the CPU's embedding_bag backend: the interpreter would take minutes a
# step), results to a temporary folder (the venv is removed after). A missing import or a wrong path fails
# here, not on the device. It also counts the triton compilations the kernel tests trigger (each
# specialization times its autotuning candidates, tests/kernels/conftest.py) and fails if they exceed
# KERNEL_TEST_COMPILATIONS, from which the kernel-test limit is derived.
set -uo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash benchmarks/gpu_suite.sh [--dry-run | --rehearse]"
MODE=run
if [[ $# -gt 1 ]]; then
  echo "$usage   (got: $*)" >&2
  exit 2
elif [[ $# -eq 1 ]]; then
  case "$1" in
    --dry-run) MODE=dry-run ;;
    --rehearse) MODE=rehearse ;;
    *) echo "$usage   (got: $*)" >&2; exit 2 ;;
  esac
fi

IMAGE_PACKAGES="torch==2.13.0 triton==3.6.0 lightning==2.6.6 torchmetrics tensorboard tokenizers safetensors numpy rich pytest pytest-timeout setuptools"
CARRIED_WHEELS="jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 ninja==1.13.2 xxhash==4.1.0"

# LIMITS, in seconds. Kernel tests: the compilations counted by --rehearse (163 with triton 3.6 and 3.9;
# KERNEL_TEST_COMPILATIONS is the bound it checks) at MS_PER_COMPILATION each: the AOT compile of all 210
# kernel variants for sm_80 and sm_90 took 50 s of CPU time here, 0.24 s per variant, and an autotuned
# candidate adds ~0.15 s of timing (do_bench: 25 ms warm-up, 100 ms of repeats); plus CUDA_ONLY_ALLOWANCE
# for the tests that run only on a GPU (not counted: half precision, large shapes, the bitwise-repeatability
# test and inductor, which compiles kernels of its own) and STARTUP for pytest, torch and triton imports.
KERNEL_TEST_COMPILATIONS=170
MS_PER_COMPILATION=500
CUDA_ONLY_ALLOWANCE=60
STARTUP=20
KERNEL_TEST_LIMIT=$((STARTUP + CUDA_ONLY_ALLOWANCE + KERNEL_TEST_COMPILATIONS * MS_PER_COMPILATION / 1000))
# Memory-layer benchmark: bf16, width 1024 (128 tables), 4 token counts in 2 triton specializations (1 token,
# multiples of 16): hash 2, gather 2 x 4 candidates, atomic 2 x 3, row gradient + combine + chunk gradient
# 2 x 3 = 28 compilations (14 s), 4 autotuned token buckets x 7 candidates x 0.15 s of timing (4 s), 32 timed
# shapes and 18 skewed cases at ~0.3 s each (15 s), the 1 GiB copy and imports (15 s): limit 90 s.
BENCHMARK_LIMIT=90
# mf doctor on a GPU: its own goal is 3 minutes (kernel compilations and autotuning included): limit 180 s.
DOCTOR_LIMIT=180
# Training: 4 fits of 40 steps of 64 x 2048 tokens (estimated 0.5 s a step for MemoryFormer-tiny: 30-70 GB of
# table rows gathered per layer forward at ~3 TB/s), a BPE tokenizer and token cache per fit (~10 s), and one
# inductor compile per model with model.compile (~40 s): limit 200 s. Not yet measured on a GPU.
TRAINING_LIMIT=200
# Total: 7 + 180 + 165 + 90 + 200 = 642 s at most (the doctor's 3 minutes on top of the former 8).

PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/mf_site}
if [[ $MODE == rehearse ]]; then
  WORK=$(mktemp -d /tmp/mf_gpu_suite_rehearsal.XXXXXX)
  PYTHON=$WORK/venv/bin/python
  SITE=$WORK/site
  OUTPUTS=$WORK
  export TRITON_INTERPRET=1 MF_COUNT_COMPILATIONS=$WORK/compilations.json
  unset MF_TEST_CUDA
  KERNEL_TESTS="$PYTHON -m pytest tests/kernels -q -x -p no:cacheprovider"
  BENCHMARK_ARGS="--device cpu --backends embedding_bag triton --tokens 1 16 --widths 64 --skew-tokens 16 --min-run-time 0.01 --output $OUTPUTS/memory_layer.md"
  DOCTOR_ARGS="--device cpu --quick --out $OUTPUTS/doctor.md"
  TRAINING_ARGS="--accelerator cpu --steps 3 --log-every 1 --runs-dir $OUTPUTS/runs --output $OUTPUTS/gpu_train.md --set model.preset=debug data.seq_len=16 data.batch_size=2 data.tokenizer=byte data.num_workers=0"
  DEVICE_NAME='"cpu (rehearsal)"'
  KERNEL_TEST_LIMIT=1500 BENCHMARK_LIMIT=900 TRAINING_LIMIT=1200 DOCTOR_LIMIT=600
else
  export TRITON_INTERPRET=0 MF_TEST_CUDA=1
  KERNEL_TESTS="$PYTHON -m pytest tests/kernels -q -x -p no:cacheprovider -m 'not slow'"
  BENCHMARK_ARGS="--device cuda --dtypes bfloat16 --widths 1024 --tokens 1 256 4096 16384 --min-run-time 0.1 --note 'benchmarks/gpu_suite.sh'"
  DOCTOR_ARGS="--device cuda --out benchmarks/results/doctor_gpu.md"
  TRAINING_ARGS="--steps 40"
  DEVICE_NAME="torch.cuda.get_device_name()"
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

STEPS=(
  "install|if ls .whl/*.whl >/dev/null 2>&1; then $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl; fi && $PYTHON -m pip install -q --no-index --no-deps --no-build-isolation -e . && $PYTHON -c 'import jsonargparse, mf_lightning, torch, triton; print(torch.__version__, triton.__version__, $DEVICE_NAME)'"
  "doctor|timeout $DOCTOR_LIMIT $PYTHON -m mf_lightning doctor $DOCTOR_ARGS"
  "kernel tests|timeout $KERNEL_TEST_LIMIT $KERNEL_TESTS"
  "memory layer benchmark|timeout $BENCHMARK_LIMIT $PYTHON benchmarks/memory_layer.py $BENCHMARK_ARGS"
  "training throughput|timeout $TRAINING_LIMIT $PYTHON benchmarks/gpu_train.py $TRAINING_ARGS"
)

if [[ $MODE == dry-run ]]; then
  for index in "${!STEPS[@]}"; do
    echo "step $((index + 1)): ${STEPS[$index]%%|*}"
    echo "  \$ ${STEPS[$index]#*|}"
  done
  exit 0
fi

failed=()
suite_start=$SECONDS
if [[ $MODE == rehearse ]]; then
  echo "=== rehearsal in $WORK: a fresh venv with $IMAGE_PACKAGES"
  python3 -m venv "$WORK/venv" && "$PYTHON" -m pip install -q $IMAGE_PACKAGES || { echo "FAILED: the image's packages did not install" >&2; exit 1; }
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$WORK/wheels" $CARRIED_WHEELS \
      && "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WORK"/wheels/*.whl \
      || { echo "FAILED: the carried wheels ($CARRIED_WHEELS) did not download" >&2; exit 1; }
  fi
fi
for index in "${!STEPS[@]}"; do
  name=${STEPS[$index]%%|*}
  start=$SECONDS
  echo "=== step $((index + 1)): $name"
  export TRITON_CACHE_DIR=$(mktemp -d /tmp/mf_triton_cache.XXXXXX)
  if ! bash -c "${STEPS[$index]#*|}"; then
    failed+=("$name")
  fi
  compiled=$(find "$TRITON_CACHE_DIR" -name '*.cubin' | wc -l)
  echo "=== step $((index + 1)): $name took $((SECONDS - start)) s, $compiled kernels compiled"
done
if [[ $MODE == rehearse ]]; then
  counted=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['compilations'])" "$MF_COUNT_COMPILATIONS" 2>/dev/null)
  echo "=== the kernel tests trigger ${counted:-an unknown number of} compilations on a GPU (limit derived from $KERNEL_TEST_COMPILATIONS)"
  if [[ -z $counted || $counted -gt $KERNEL_TEST_COMPILATIONS ]]; then
    echo "raise KERNEL_TEST_COMPILATIONS in benchmarks/gpu_suite.sh to the count, and check the suite still fits 8 minutes" >&2
    failed+=("compilation count")
  fi
  rm -rf "$WORK/venv" "$WORK/site" "$WORK/wheels" "$WORK/runs"
fi
echo "=== suite took $((SECONDS - suite_start)) s; results under ${OUTPUTS:-benchmarks/results}/"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED steps: ${failed[*]}" >&2
  exit 1
fi
