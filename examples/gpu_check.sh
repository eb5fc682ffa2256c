#!/usr/bin/env bash
# The GPU check: every command that trains, on CUDA and on the same machine's CPU (same
# seed), each output reloaded and reported in a process that sees no GPU; torchrun with NCCL.
# Run from the repository root on a machine with a CUDA GPU:
#     OUT=/some/folder bash examples/gpu_check.sh
# Knobs: GPU_CHECK_EPOCHS (2), GPU_CHECK_BUDGET (45s, the search's --time-budget),
# GPU_CHECK_LIMIT (420 s for everything), GPU_CHECK_QUICK=1 (300 images at 8x8: a dry run).
# Everything goes to $OUT/gpu.log; the table also to stdout and $OUT/gpu_check.json.
set -u
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
# torchslim is the repository root itself: expose it under its package name
mkdir -p /tmp/pp && ln -sfn "$PWD" /tmp/pp/torchslim
export PYTHONPATH=/tmp/site:/tmp/pp
if [ -d .whl ] && ! python3 -c "import torch_pruning, tomli_w" 2>/dev/null; then
  python3 -m pip install --quiet --no-deps --target /tmp/site .whl/*.whl >>"$OUT/gpu.log" 2>&1
fi
python3 -c "import torchslim, torch_pruning" || { echo "torchslim or torch_pruning missing" >&2; exit 3; }
export PYTHONUNBUFFERED=1
python3 examples/gpu_check.py --out "$OUT" "$@"
rc=$?
echo "gpu_check rc $rc" | tee -a "$OUT/gpu.log"
exit $rc
