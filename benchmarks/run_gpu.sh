#!/usr/bin/env bash
# The CUDA checks and the GPU benchmark points, as one script for a GPU machine with PyTorch
# (and transformers) installed, in about 8 minutes: tests/test_cuda.py (the model against the
# CPU, FlexAttention's Triton kernels against the CPU's blockwise kernel, launches per layer),
# then run_all.py for the fp32/bf16 matmul rate, train steps of ours, HF and SDPA at 16K and
# 64K (ours and HF at 256K), ours in fp32 and bf16 at 16K..256K, kernel launches per layer at
# 4K..64K and one million tokens.
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]             # records to OUT_DIR (default benchmarks/results)
#   DEVICE=cpu bash benchmarks/run_gpu.sh [OUT_DIR]  # every stage at small sizes on the CPU
#
# DEVICE=cpu checks the script end to end where there is no GPU: the same stages, lengths of
# 1K..8K, results in gpu-cpu-check.jsonl (HF only when transformers imports). Each stage has
# its own time limit so that a slow one cannot starve the rest; the results file is copied to
# OUT_DIR after every stage, and the report is rendered at the end:
#   python benchmarks/report.py benchmarks/results/gpu.jsonl --out docs/benchmarks-gpu.md
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3)}
HF=,hf
"$PY" -c 'import transformers' 2>/dev/null || HF=
if [ "$DEVICE" = cuda ]; then
    NAME=gpu MAIN=16K,64K BIG=256K BF16=16K,64K,256K LAUNCH=4K,16K,64K MILLION=1M
    REPORT=docs/benchmarks-gpu.md
    nvidia-smi -L
else
    NAME=gpu-cpu-check MAIN=1K,2K BIG=4K BF16=1K,2K LAUNCH=1K,2K MILLION=8K
    REPORT=$OUT/benchmarks-gpu-cpu-check.md
fi
RESULTS=benchmarks/results/$NAME.jsonl
stage() {  # stage SECONDS ARGS...: one run_all.py call, then copy the results out
    local limit=$1; shift
    timeout "$limit" "$PY" benchmarks/run_all.py --name "$NAME" --device "$DEVICE" \
        --python "$PY" --max-seconds 60 --budget-seconds 30 --retry-busy 0 "$@"
    [ "$OUT" != benchmarks/results ] && cp "$RESULTS" "$OUT/" 2>/dev/null
    return 0
}

"$PY" -c 'import torch, sys; print("torch", torch.__version__, "python", sys.version.split()[0])'
timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"

stage 20 --only matmul
stage 100 --only lengths --systems "ours,sdpa$HF" --lengths "$MAIN"
stage 70 --only lengths --systems "ours$HF" --lengths "$BIG"
stage 90 --only bf16 --bf16-lengths "$BF16"
stage 50 --only launches --launch-lengths "$LAUNCH"
stage 60 --only million --million-length "$MILLION"
"$PY" benchmarks/report.py "$RESULTS" --out "$REPORT"
