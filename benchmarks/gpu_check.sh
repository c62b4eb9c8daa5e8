#!/usr/bin/env bash
# GPU check: build, GPU tests and CUDA benchmarks in one go, within a fixed time budget.
#
#   bash benchmarks/gpu_check.sh OUTDIR          (or: make gpu-check)
#
# For a machine with a CUDA GPU whose system python already has torch + triton (no network
# needed: nothing is downloaded). Steps, each under `timeout` so the whole run stays inside
# GPU_CHECK_BUDGET_S (default 470 s, i.e. under 8 minutes):
#
#   1 info        nvidia-smi, date, python/torch/triton versions, git commit   -> info.log
#   2 build       MAX_JOBS=16 pip install -e . --no-build-isolation (fallback:
#                 setup.py build_ext --inplace); failure only skips the aten rows -> build.log
#   3 tests       FUSED_CKPT_AUTOTUNE=0 python -m pytest -q -m gpu tests    -> pytest_gpu.log
#   4 bench_ffn   benchmarks/bench_ffn.py, default CUDA shapes              -> bench_ffn.log,
#                                                                           bench_ffn/results.{json,md}
#   5 bench       python -m fused_ckpt.bench (attention, block, step suites;  -> bench.log,
#                 the ffn suite ran in step 4), BENCH_ARGS (default --quick)   bench/results.{json,md}, PNGs
#   6 attention   benchmarks/bench_attention.py --quick, when it exists     -> bench_attention.log
#
# A failing or timed-out step is recorded in OUTDIR/summary.md and the next step still runs.
# Knobs: PYTHON (default python3), GPU_CHECK_BUDGET_S, BENCH_FFN_ARGS (extra bench_ffn options),
# BENCH_ARGS (options of python -m fused_ckpt.bench; default "--quick").
set -u

SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python3}

info() {
  echo "date: $(date -Is)"
  echo "host: $(hostname)"
  echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo n/a)"
  git -C "$ROOT" status --short 2>/dev/null | head -50
  echo "--- nvidia-smi"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
  nvidia-smi 2>&1 | head -20
  echo "--- python"
  command -v "$PY"
  "$PY" - <<'EOF'
import platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
except Exception as e:
    print("torch import failed:", e)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton import failed:", e)
EOF
}

build() {
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # compile for this GPU only (faster build)
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null)
    [ -n "$TORCH_CUDA_ARCH_LIST" ] && export TORCH_CUDA_ARCH_LIST
  fi
  echo "MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default}"
  if ! "$PY" -m pip install -e . --no-build-isolation --no-deps --no-index; then
    echo "[build] pip install failed; trying setup.py build_ext --inplace"
    "$PY" setup.py build_ext --inplace || return 1
  fi
  "$PY" -c "import fused_ckpt._C as c; print('fused_ckpt._C loaded, WITH_CUDA =', c.WITH_CUDA)"
}

# `timeout` runs programs, not shell functions: steps written as functions re-enter this script.
case "${1:-}" in
  __info) info; exit $? ;;
  __build) cd "$ROOT" && build; exit $? ;;
esac

if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$ROOT" || exit 2
BUDGET=${GPU_CHECK_BUDGET_S:-470}
START=$SECONDS
SUMMARY="$OUT/summary.md"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}

{
  echo "# gpu_check summary"
  echo
  echo "- started: $(date -Is)"
  echo "- repository: $ROOT"
  echo "- budget: ${BUDGET} s"
  echo
  echo "| step | result | seconds | log |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

remaining() { echo $(( BUDGET - (SECONDS - START) )); }

# run_step NAME CAP_S RESERVE_S LOG CMD...: runs CMD under timeout min(CAP, remaining - RESERVE),
# where RESERVE is the time kept back for the steps that follow.
# CAP and RESERVE are sized for the default 470 s budget and scale with GPU_CHECK_BUDGET_S.
run_step() {
  local name=$1 cap=$(( $2 * BUDGET / 470 )) reserve=$(( $3 * BUDGET / 470 )) log=$4
  shift 4
  local left=$(( $(remaining) - reserve ))
  local t=$(( cap < left ? cap : left ))
  if [ "$t" -lt 10 ]; then
    echo "[gpu_check] $name: skipped (no time left)"
    echo "| $name | skipped: no time left | 0 | |" >> "$SUMMARY"
    return 0
  fi
  echo "[gpu_check] $name (timeout ${t}s) -> $log"
  local t0=$SECONDS
  timeout -k 5 "$t" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  local dt=$(( SECONDS - t0 ))
  local result="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    result="TIMED OUT after ${t}s (rc=$rc)"
  elif [ $rc -ne 0 ]; then
    result="FAILED (rc=$rc)"
  fi
  echo "[gpu_check] $name: $result (${dt}s)"
  echo "| $name | $result | $dt | $log |" >> "$SUMMARY"
  tail -n 3 "$OUT/$log" | sed 's/^/    /'
  return 0
}

run_step info 30 440 info.log bash "$SELF" __info
run_step build 150 290 build.log bash "$SELF" __build
# FUSED_CKPT_AUTOTUNE=0: one config per kernel variant (the first that survives pruning), so the
# GPU tests compile each variant once instead of once per autotune candidate
run_step tests 100 230 pytest_gpu.log env FUSED_CKPT_AUTOTUNE=0 "$PY" -m pytest -q -m gpu tests \
  -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml"
# shellcheck disable=SC2086  # BENCH_FFN_ARGS is a list of options
run_step bench_ffn 200 120 bench_ffn.log "$PY" -u benchmarks/bench_ffn.py --device cuda \
  --out "$OUT/bench_ffn" ${BENCH_FFN_ARGS:-}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
run_step bench 160 40 bench.log "$PY" -u -m fused_ckpt.bench --device cuda --no-progress \
  --suite attention,block,step --out "$OUT/bench" ${BENCH_ARGS:---quick}
if [ -f benchmarks/bench_attention.py ]; then
  ATT_ARGS=(--quick)
  grep -q -- "--out" benchmarks/bench_attention.py && ATT_ARGS+=(--out "$OUT/bench_attention")
  run_step bench_attention 120 0 bench_attention.log "$PY" -u benchmarks/bench_attention.py "${ATT_ARGS[@]}"
else
  echo "| bench_attention | skipped: benchmarks/bench_attention.py not present | 0 | |" >> "$SUMMARY"
fi

{
  echo
  echo "- finished: $(date -Is), $(( SECONDS - START )) s in all"
  for f in "$OUT/bench_ffn/results.md" "$OUT/bench/results.md"; do
    if [ -f "$f" ]; then
      echo
      cat "$f"
    fi
  done
} >> "$SUMMARY"
echo "[gpu_check] done in $(( SECONDS - START ))s; summary: $SUMMARY"
exit 0
