#!/usr/bin/env bash
# The CUDA checks and the GPU benchmark points, as one script for a GPU machine with PyTorch
# (and transformers) installed: tests/test_cuda.py, then run_all.py --device cuda for the
# fp32/bf16 matmul rate, the systems at 16K..256K, bf16 at 64K and one million tokens.
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]     # records to OUT_DIR (default benchmarks/results)
#
# Each stage has its own time limit so that a slow one cannot starve the rest; the results
# file is copied to OUT_DIR after every stage. Render with
#   python benchmarks/report.py benchmarks/results/gpu.jsonl --out docs/benchmarks-gpu.md
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3)}
RESULTS=benchmarks/results/gpu.jsonl
stage() {  # stage SECONDS ARGS...: one run_all.py call, then copy the results out
    local limit=$1; shift
    timeout "$limit" "$PY" benchmarks/run_all.py --name gpu --device cuda --python "$PY" \
        --max-seconds 60 --budget-seconds 60 "$@"
    [ "$OUT" != benchmarks/results ] && cp "$RESULTS" "$OUT/" 2>/dev/null
    return 0
}

nvidia-smi -L
"$PY" -c 'import torch, sys; print("torch", torch.__version__, "python", sys.version.split()[0])'
timeout 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"

stage 25 --only matmul
stage 120 --only lengths --systems ours,sdpa,hf,lucidrains --lengths 16K,64K
stage 100 --only lengths --systems ours,hf,lucidrains --lengths 256K  # SDPA: ~20 s a step
stage 40 --only bf16
stage 80 --only million
