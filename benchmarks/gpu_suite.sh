#!/usr/bin/env bash
# The GPU suite: proves the GPU path of mf_lightning on one NVIDIA GPU (H100/H200) in <= 8 minutes, offline
# (each step has a time limit: 150 + 110 + 200 s after the install).
#
#   bash benchmarks/gpu_suite.sh            # run every step, tables under benchmarks/results/ naming the GPU
#   bash benchmarks/gpu_suite.sh --dry-run  # list the steps and their commands, run nothing
#
# Needs python3 with torch, triton and lightning (and torchmetrics, tensorboard, tokenizers, safetensors,
# rich, numpy). What the GPU image may lack travels as wheels in .whl/ at the repository root (ignored by
# git, never committed): jsonargparse and its signature extras. Fetch them on a machine with pip access:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
# and carry .whl with the checkout (the device tool: carry=[".whl"]). Steps:
#   1. install: the wheels into $SITE, then `pip install --no-deps -e .` (never touches torch);
#   2. MF_TEST_CUDA=1 pytest tests/kernels: compiled kernels, fp32/bf16/fp16, both backward modes,
#      torch.compile(fullgraph=True), AOT compile for sm_90 without spills;
#   3. benchmarks/memory_layer.py --device cuda: triton, embedding_bag, nn.Linear, 1..16384 tokens x
#      1024/2048, fp32 and bf16, forward and forward+backward, bandwidth vs the device's peak;
#   4. benchmarks/gpu_train.py: 60 steps of mf fit, memoryformer_tiny and transformer_tiny, bf16-mixed,
#      with and without model.compile: tokens/s, step time, peak GPU memory.
# Every step runs even if an earlier one failed; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/mf_site}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 MF_TEST_CUDA=1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

STEPS=(
  "install|if ls .whl/*.whl >/dev/null 2>&1; then $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl; fi && $PYTHON -m pip install -q --no-index --no-deps --no-build-isolation -e . && $PYTHON -c 'import jsonargparse, mf_lightning, torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
  "kernel tests|timeout 150 $PYTHON -m pytest tests/kernels -q -x -p no:cacheprovider -m 'not slow'"
  "memory layer benchmark|timeout 110 $PYTHON benchmarks/memory_layer.py --device cuda --min-run-time 0.1 --note 'benchmarks/gpu_suite.sh'"
  "training throughput|timeout 200 $PYTHON benchmarks/gpu_train.py --steps 60"
)

if [[ "${1:-}" == "--dry-run" ]]; then
  for index in "${!STEPS[@]}"; do
    echo "step $((index + 1)): ${STEPS[$index]%%|*}"
    echo "  \$ ${STEPS[$index]#*|}"
  done
  exit 0
elif [[ $# -gt 0 ]]; then
  echo "usage: bash benchmarks/gpu_suite.sh [--dry-run]   (got: $*)" >&2
  exit 2
fi

failed=()
suite_start=$SECONDS
for index in "${!STEPS[@]}"; do
  name=${STEPS[$index]%%|*}
  start=$SECONDS
  echo "=== step $((index + 1)): $name"
  if ! bash -c "${STEPS[$index]#*|}"; then
    failed+=("$name")
  fi
  echo "=== step $((index + 1)): $name took $((SECONDS - start)) s"
done
echo "=== suite took $((SECONDS - suite_start)) s; results under benchmarks/results/"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED steps: ${failed[*]}" >&2
  exit 1
fi
