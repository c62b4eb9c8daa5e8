#!/usr/bin/env bash
# GPU check: environment, GPU tests and CUDA benchmarks in one go, within a fixed time budget,
# leaving results behind whatever happens.
#
#   bash benchmarks/gpu_check.sh OUTDIR          (or: make gpu-check)
#
# For a machine with a CUDA GPU whose system python already has torch + triton (no network
# needed: nothing is downloaded; torch 2.11 + triton 3.6 and torch 2.13 + triton 3.9 alike).
# Steps in priority order, each under `timeout`, the whole inside GPU_CHECK_BUDGET_S (default
# 480 s). Caps below are for the default budget and scale with it; each step also leaves the
# steps after it their reserve, so a slow step cannot eat the tests' time.
#
#   step            cap   what                                                  -> OUTDIR/
#   info             20   nvidia-smi, python/torch/triton versions, git commit    info.log
#   build           120   the csrc extension for this GPU (skipped when it          build.log
#                         already imports with CUDA kernels; a failure only
#                         skips the aten rows)
#   tests           240   FUSED_CKPT_AUTOTUNE=0 pytest -m gpu tests: every          pytest_gpu.{log,xml}
#                         Triton test compiled on CUDA tensors + the gpu tests
#   ffn_core        100   ffn suite, one full-size shape per activation family      ffn_core/results.{json,md}
#                         (gelu, swiglu), one torch.compile budget
#   attention_step   70   attention and step suites, --quick                       attention_step/
#   ffn_rest       rest   the third default FFN shape, both compile budgets          ffn_rest/
#   block          rest   block suite, --quick                                     block/
#   bench_attention rest  benchmarks/bench_attention.py --quick                    bench_attention/
#
# Partial results: pytest is stopped with SIGINT (it still writes its junit XML); the benchmarks
# with SIGTERM (they write results.json after every shape and again when terminated). Each step
# adds its row to OUTDIR/summary.md as soon as it ends (ok / FAILED / TIMED OUT / skipped: no
# time left), so the summary is there even if this script itself is killed; the test row
# carries junit's passed/failed/skipped counts and the failed tests follow the table.
# Knobs: PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_MIN_STEP_S (a step gets at
# least this long or is skipped; default 10), BENCH_FFN_ARGS / BENCH_ARGS (extra options of
# the FFN steps / the other fused_ckpt.bench steps).
set -u

SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python3}

info() {
  echo "date: $(date -Is)"
  echo "host: $(hostname)"
  echo "cpus: $(nproc 2>/dev/null || echo n/a)"
  echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo n/a)"
  git -C "$ROOT" status --short 2>/dev/null | head -50
  echo "--- environment"
  env | grep -E '^(FUSED_CKPT_|TRITON_|CUDA_VISIBLE_DEVICES|TORCH_)' | sort
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
  if "$PY" -c "import fused_ckpt._C as c, sys; sys.exit(0 if c.WITH_CUDA else 1)" 2>/dev/null; then
    echo "fused_ckpt._C already imports with CUDA kernels: not rebuilt"
    return 0
  fi
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
BUDGET=${GPU_CHECK_BUDGET_S:-480}
MIN_STEP=${GPU_CHECK_MIN_STEP_S:-10}
START=$SECONDS
SUMMARY="$OUT/summary.md"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}

{
  echo "# gpu_check summary"
  echo
  echo "- started: $(date -Is)"
  echo "- repository: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo n/a))"
  echo "- budget: ${BUDGET} s"
  echo
  echo "| step | result | seconds | output |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

remaining() { echo $(( BUDGET - (SECONDS - START) )); }
scaled() { local s=$(( $1 * BUDGET / 480 )); echo $(( s > 0 ? s : 1 )); }  # a cap: at least 1 s

# junit_counts FILE: "N passed, N failed, N errors, N skipped" from pytest's junit XML
junit_counts() {
  local head n f e s
  head=$(tr '\n' ' ' < "$1" | grep -o '<testsuite [^>]*>' | head -n 1)
  [ -n "$head" ] || { echo "no junit counts"; return; }
  attr() { echo "$head" | grep -o " $1=\"[0-9]*\"" | grep -o '[0-9][0-9]*' || echo 0; }
  n=$(attr tests); f=$(attr failures); e=$(attr errors); s=$(attr skipped)
  echo "$(( n - f - e - s )) passed, $f failed, $e errors, $s skipped"
}

# run_step NAME CAP RESERVE SIGNAL LOG OUTPUTS CMD...: CMD under timeout (SIGNAL first, SIGKILL 10 s
# later) for min(CAP, remaining - RESERVE) seconds; CAP "rest" means all the time left. CAP and
# RESERVE are for the 480 s budget and scale with GPU_CHECK_BUDGET_S. OUTPUTS names what the
# step leaves in OUTDIR besides its log (shown in the summary).
run_step() {
  local name=$1 cap=$2 reserve=$3 sig=$4 log=$5 outputs=$6
  shift 6
  reserve=$(( reserve * BUDGET / 480 ))
  local left=$(( $(remaining) - reserve ))
  if [ "$cap" = rest ]; then cap=$left; else cap=$(scaled "$cap"); fi
  local t=$(( cap < left ? cap : left ))
  if [ "$t" -lt "$MIN_STEP" ]; then
    echo "[gpu_check] $name: skipped (no time left)"
    echo "| $name | skipped: no time left | 0 | |" >> "$SUMMARY"
    return 0
  fi
  echo "[gpu_check] $name (timeout ${t}s) -> $log"
  local t0=$SECONDS
  timeout -s "$sig" -k 10 "$t" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  local dt=$(( SECONDS - t0 ))
  local result="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    result="TIMED OUT after ${t}s (rc=$rc), partial results kept"
  elif [ $rc -ne 0 ]; then
    result="FAILED (rc=$rc)"
  fi
  if [ "$name" = tests ] && [ -f "$OUT/pytest_gpu.xml" ]; then
    result="$result: $(junit_counts "$OUT/pytest_gpu.xml")"
  elif [ "$name" = tests ]; then
    result="$result: no junit XML"
  fi
  echo "[gpu_check] $name: $result (${dt}s)"
  echo "| $name | $result | $dt | $log $outputs |" >> "$SUMMARY"
  tail -n 3 "$OUT/$log" | sed 's/^/    /'
  return 0
}

BENCH=("$PY" -u -m fused_ckpt.bench --device cuda --no-progress)
run_step info 20 440 TERM info.log "" bash "$SELF" __info
run_step build 120 280 TERM build.log "" bash "$SELF" __build
# FUSED_CKPT_AUTOTUNE=0: one config per kernel variant, so each compiles once, not once per
# autotune candidate. -m gpu selects every Triton test on a CUDA machine (tests/conftest.py).
run_step tests 240 90 INT pytest_gpu.log pytest_gpu.xml env FUSED_CKPT_AUTOTUNE=0 \
  "$PY" -m pytest -q -rfE -m gpu tests -p no:cacheprovider --durations=10 --junitxml="$OUT/pytest_gpu.xml"
# shellcheck disable=SC2086  # BENCH_FFN_ARGS / BENCH_ARGS are lists of options
run_step ffn_core 100 30 TERM ffn_core.log ffn_core/ "${BENCH[@]}" --suite ffn \
  --ffn-shapes 8192x4096x16384:gelu,8192x4096x14336:swiglu --compile-budgets 0.5 --out "$OUT/ffn_core" \
  ${BENCH_FFN_ARGS:-}
# shellcheck disable=SC2086
run_step attention_step 70 0 TERM attention_step.log attention_step/ "${BENCH[@]}" --suite attention,step \
  --quick --out "$OUT/attention_step" ${BENCH_ARGS:-}
# shellcheck disable=SC2086
run_step ffn_rest rest 30 TERM ffn_rest.log ffn_rest/ "$PY" -u benchmarks/bench_ffn.py --device cuda \
  --shapes 8192x4096x11008:swiglu --out "$OUT/ffn_rest" ${BENCH_FFN_ARGS:-}
# shellcheck disable=SC2086
run_step block rest 15 TERM block.log block/ "${BENCH[@]}" --suite block --quick --out "$OUT/block" \
  ${BENCH_ARGS:-}
run_step bench_attention rest 0 TERM bench_attention.log bench_attention/ "$PY" -u benchmarks/bench_attention.py \
  --quick --out "$OUT/bench_attention"

{
  echo
  echo "- finished: $(date -Is), $(( SECONDS - START )) s in all"
  if [ -f "$OUT/pytest_gpu.log" ]; then
    fails=$(grep -E '^(FAILED|ERROR) ' "$OUT/pytest_gpu.log" | head -n 40)
    if [ -n "$fails" ]; then
      echo
      echo "## Failed tests"
      echo
      echo '```'
      echo "$fails"
      echo '```'
    fi
  fi
  for f in "$OUT"/ffn_core/results.md "$OUT"/attention_step/results.md "$OUT"/ffn_rest/results.md \
           "$OUT"/block/results.md; do
    if [ -f "$f" ]; then
      echo
      cat "$f"
    fi
  done
} >> "$SUMMARY"
echo "[gpu_check] done in $(( SECONDS - START ))s; summary: $SUMMARY"
exit 0
