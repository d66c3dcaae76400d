#!/usr/bin/env bash
# GPU check of deepmlf-fast in one call, on a machine with a CUDA GPU:
#
#   1. env          device, driver and library versions; carried wheels (.whl/) installed
#   2. compile      python -m deepmlf_kernels.aot (every Triton kernel)
#   3. correctness  pytest tests/ops -x on the device
#   4. xattn        cross-attention microbenchmarks, timed, recorded (--record)
#   5. sattn        self-attention microbenchmarks, timed, recorded (compiles FlexAttention per shape)
#   6. step         whole-step benchmark (official-style vs ours) + the parity sanity test, recorded
#   7. table        benchmarks/render.py for this device, to stdout and to $OUT
#
# Usage (from anywhere):  bash benchmarks/gpu_check.sh [section ...]      (default: all sections)
# Knobs (environment):
#   GPU_CHECK_TIMEOUT_<SECTION>  seconds per section (upper bounds; benchmark sections stop starting
#                                new cases 30 s before theirs and still record). The defaults add up to
#                                ~13 min: under a 10-minute per-call limit run two calls, e.g.
#                                `gpu_check.sh env compile correctness xattn` then `gpu_check.sh sattn step`,
#                                copy each call's $OUT/results/*.csv into benchmarks/results/ and render
#                                locally (python benchmarks/render.py).
#   DEEPMLF_BENCH_SHAPES         micro shape list: full (default on CUDA) or small
#   DEEPMLF_BENCH_REP_MS         CUDA timing budget per micro case (default 100 ms)
#   DEEPMLF_BENCH_STEPS          timed training steps per step provider (default 10)
#   OUT                          if set: logs, rendered tables and the result CSVs are copied there
#
# Every section runs even if an earlier one failed (the table is always rendered from whatever was
# recorded); the script exits non-zero at the end if any section failed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
SECTIONS=("$@")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=(env compile correctness xattn sattn step table)
OUT_DIR="${OUT:-}"
if [ -n "$OUT_DIR" ]; then
  mkdir -p "$OUT_DIR"
  exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
fi
export PYTHONUNBUFFERED=1
export DEEPMLF_CACHE="${DEEPMLF_CACHE:-/tmp/deepmlf_cache}"
PY=(python3 -P)  # -P: never import from the cwd (the repo's top-level `kernels/` must not shadow anything)
FAILED=()

banner() { printf '\n==================== %s ====================\n' "$*"; }

want() { local s; for s in "${SECTIONS[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

# run_section NAME DEFAULT_TIMEOUT CMD...: run with a timeout, record failure, never abort the script.
run_section() {
  local name="$1" default_timeout="$2"; shift 2
  local var="GPU_CHECK_TIMEOUT_${name^^}"
  local limit="${!var:-$default_timeout}"
  banner "$name (timeout ${limit}s)"
  local t0=$SECONDS rc=0
  # Benchmarks stop starting new cases 30 s before the limit, so they still print and record.
  DEEPMLF_BENCH_DEADLINE_S=$((limit > 60 ? limit - 30 : limit)) timeout --kill-after=20 "$limit" "$@" || rc=$?
  if [ $rc -ne 0 ]; then
    [ $rc -eq 124 ] && echo "!! $name: timed out after ${limit}s"
    echo "!! $name: FAILED (exit $rc) after $((SECONDS - t0))s"
    FAILED+=("$name")
  else
    echo "-- $name: ok in $((SECONDS - t0))s"
  fi
}

# --- environment: wheels, importability --------------------------------------------------------
banner "setup"
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# deepmlf_kernels lives in the top-level kernels/ folder (setup.py maps it). Without an install,
# expose the repo through a symlink tree so `deepmlf_kernels` resolves to kernels/.
if ! "${PY[@]}" -c "import deepmlf_kernels" 2>/dev/null; then
  SHIM=/tmp/deepmlf_shim
  rm -rf "$SHIM" && mkdir -p "$SHIM/deepmlf_fast"
  for entry in "$REPO"/deepmlf_fast/*; do ln -s "$entry" "$SHIM/deepmlf_fast/$(basename "$entry")"; done
  ln -s "$REPO/kernels" "$SHIM/deepmlf_fast/kernels"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  echo "deepmlf_fast exposed through $SHIM"
fi
"${PY[@]}" -c "import deepmlf_fast, deepmlf_kernels; print('deepmlf_fast from', deepmlf_fast.__file__)" \
  || FAILED+=("import")

if want env; then
  run_section env 60 bash -c '
    nvidia-smi --query-gpu=name,driver_version,power.limit,memory.total,clocks.max.sm --format=csv || true
    python3 -P - <<EOF
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
for name in ("triton", "transformers", "pytest", "pytest_benchmark", "flash_attn"):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:
        print(name, "not available:", type(exc).__name__)
assert torch.cuda.is_available(), "no CUDA device"
EOF'
fi

if want compile; then
  if "${PY[@]}" -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepmlf_kernels.aot') is None)"; then
    run_section compile 90 "${PY[@]}" -m deepmlf_kernels.aot
  else
    banner "compile"
    echo "!! compile: deepmlf_kernels.aot does not exist yet"
    FAILED+=("compile")
  fi
fi

PYTEST=("${PY[@]}" -m pytest -p no:cacheprovider -q -ra)

if want correctness; then
  run_section correctness 150 "${PYTEST[@]}" tests/ops -x
fi

if want xattn; then
  run_section xattn 150 "${PYTEST[@]}" benchmarks/test_bench_cross_attention.py \
    --benchmark-enable --record --bench-device cuda
fi

if want sattn; then
  run_section sattn 180 "${PYTEST[@]}" benchmarks/test_bench_self_attention.py \
    --benchmark-enable --record --bench-device cuda
fi

if want step; then
  run_section step 170 "${PYTEST[@]}" benchmarks/test_bench_step.py benchmarks/test_bench_step_parity.py \
    --benchmark-enable --record --bench-device cuda
fi

if want table; then
  DEVICE_NAME="$("${PY[@]}" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null || echo "")"
  args=(benchmarks/render.py)
  [ -n "$DEVICE_NAME" ] && args+=(--device "$DEVICE_NAME")
  [ -n "$OUT_DIR" ] && args+=(-o "$OUT_DIR/bench_tables.md")
  run_section table 60 "${PY[@]}" "${args[@]}"
fi

if [ -n "$OUT_DIR" ] && compgen -G "benchmarks/results/*.csv" >/dev/null; then
  mkdir -p "$OUT_DIR/results" && cp benchmarks/results/*.csv "$OUT_DIR/results/"
  echo "result CSVs copied to $OUT_DIR/results (copy them back into benchmarks/results/ to commit)"
fi

banner "summary"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED sections: ${FAILED[*]}"
  exit 1
fi
echo "all sections passed: ${SECTIONS[*]}"
