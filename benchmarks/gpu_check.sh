#!/usr/bin/env bash
# The GPU check of issue 8, in one go on a CUDA machine (budget: 8 minutes on one H200):
#   1. the CUDA tests (tests/gpu/, skipped without CUDA) and the CPU tests of the same code paths;
#   2. bfloat16/float16 agreement with float32 on CUDA for all six models (benchmarks/bench_precision.py);
#   3. bare forward against end-to-end partition throughput, FLOPs and MFU for all six embedding assets
#      in bfloat16 (benchmarks/bench_partition.py pipeline --device cuda --peak-tflops 989).
# Results: benchmarks/results/precision_cuda.json, partition_pipeline_cuda.json, gpu_check_summary.txt
# and the full log gpu_check.log. Installs nothing: the environment is the repository's .venv
# (scripts/setup.sh). Each step has its own time limit and a failed step does not stop the others.
#
#   benchmarks/gpu_check.sh              # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run    # the CPU parts only, small, results to a scratch folder
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ ! -x "$PY" ]; then
  echo "gpu_check: $PY not found; run scripts/setup.sh first (or set PYTHON)" >&2
  exit 2
fi
if [ "$DRY" = 1 ]; then
  OUT=${RS_EMBED_BENCH_RESULTS:-$(mktemp -d -t gpu-check-dry-XXXX)}
  DEVICE=cpu
else
  OUT=benchmarks/results
  DEVICE=cuda
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); run it on a GPU worker" >&2
    exit 3
  fi
fi
mkdir -p "$OUT"
export RS_EMBED_BENCH_RESULTS="$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/gpu_check_summary.txt"
: > "$LOG"
{ echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) device=$DEVICE dry_run=$DRY commit=$(git rev-parse --short HEAD 2>/dev/null)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$SUMMARY" 2>&1
START=$(date +%s)
FAILED=0

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && FAILED=1
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
}

if [ "$DRY" = 1 ]; then
  step tests 600 "$PY" -m pytest -q -p no:cacheprovider tests/gpu tests/test_gpu_path.py -m "not slow"
  step precision 600 "$PY" benchmarks/bench_precision.py --device cpu --models fomo --chips 4 --batch 4
  step pipeline 600 env RS_EMBED_DTYPE=bfloat16 "$PY" benchmarks/bench_partition.py pipeline --device cpu \
       --models fomo --tile 31UFU-k36-r21-c12 --repeats 1
else
  # the CUDA tests, then the CPU tests of the same paths (incl. the torch.compile one)
  step tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu tests/test_gpu_path.py
  step precision 100 "$PY" benchmarks/bench_precision.py --device cuda
  # a 1372 px sub-tile: 441 FoMo chips, 36 at 224 px, 4 at 512 px; composites for AgriFM's 8 months
  step pipeline 210 env RS_EMBED_DTYPE=bfloat16 "$PY" benchmarks/bench_partition.py pipeline --device cuda \
       --peak-tflops 989 --tile 31UFU-k4-r01-c01 --repeats 2
fi
echo "total $(( $(date +%s) - START ))s failed=$FAILED results in $OUT" | tee -a "$SUMMARY"
exit "$FAILED"
