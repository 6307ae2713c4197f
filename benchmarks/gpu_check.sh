#!/usr/bin/env bash
# GPU readiness in one call: build with CUDA for this device, run the CUDA and Triton-on-GPU test
# lanes, compute-sanitizer, the bench over the issue targets and ncu, everything under OUT, a
# one-screen summary last. Exit 1 when a correctness step fails, 3 when no GPU was visible.
#
#   bash benchmarks/gpu_check.sh --out "$OUT"          # on the GPU machine (the device tool's $OUT)
#   bash benchmarks/gpu_check.sh --dry --out /tmp/gc   # anywhere: checks the script's own plumbing
#
# Every option: bash benchmarks/gpu_check.sh --help; what it measures: docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check: $PY not found (set PYTHON=...)" >&2; exit 2; }
export PYTHONUNBUFFERED=1
# the working tree's ddpm_fast (its extension is built in place), whatever is installed
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
exec "$PY" -m ddpm_fast gpucheck "$@"
