#!/usr/bin/env bash
# Whole-step time of this checkout against another commit, side by side in one run, on CPU.
#
#   bash benchmarks/compare_commits.sh BASE_REV [STEP_CONFIG ...]   (default: the CPU table configs)
#
# Why concurrently and pinned: on a shared 2-core machine, step times drift by +-10% between
# consecutive runs, more than the differences we look for. Both commits therefore run at the
# same time, each with one thread on its own core, and a second round swaps the cores; the mean
# of the two rounds cancels a slower core, and machine-wide noise hits both sides alike.
# Needs 2 cores, the project's environment (python on PATH) and the backbone cache.
set -euo pipefail
base=${1:?usage: compare_commits.sh BASE_REV [STEP_CONFIG ...]}
shift
configs=("$@")
((${#configs[@]})) || configs=(smollm2-135m-b16 gpt2-random-b16)
here=$(git rev-parse --show-toplevel)
tree=$(mktemp -d)/base
tmp=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$tree" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git -C "$here" worktree add --detach "$tree" "$base" >/dev/null 2>&1
# Commits before the kernels became `deepmlf_kernels` imported them as `deepmlf_fast.kernels`
# through a setup.py alias only; make that name resolve in the uninstalled tree.
if [ -f "$tree/kernels/__init__.py" ] && [ ! -e "$tree/deepmlf_fast/kernels" ]; then
  ln -s ../kernels "$tree/deepmlf_fast/kernels"
fi

run() {  # run CONFIG TREE CORE OUT
  (cd "$2" && OMP_NUM_THREADS=1 PYTHONPATH="$2" taskset -c "$3" python benchmarks/step_runner.py \
     --config "$1" --provider ours --steps 8 --warmup 2 --threads 1 --out "$4" 2>"$4.log")
}

echo "| config | $base (s/step) | $(git -C "$here" rev-parse --short HEAD) (s/step) | this / base |"
echo "|---|---|---|---|"
for cfg in "${configs[@]}"; do
  run "$cfg" "$here" 0 "$tmp/new1.json" & run "$cfg" "$tree" 1 "$tmp/base1.json" & wait
  run "$cfg" "$here" 1 "$tmp/new2.json" & run "$cfg" "$tree" 0 "$tmp/base2.json" & wait
  python - "$cfg" "$tmp" <<'EOF'
import json, statistics, sys
cfg, tmp = sys.argv[1], sys.argv[2]
def mean_median(side):
    return statistics.mean(statistics.median(json.load(open(f"{tmp}/{side}{r}.json"))["times_s"]) for r in (1, 2))
base, new = mean_median("base"), mean_median("new")
print(f"| {cfg} | {base:.3f} | {new:.3f} | {new / base:.3f} |")
EOF
done
python -c "import platform, torch; print(f'\nCPU {platform.processor() or platform.machine()}, torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, 1 thread per side, fp32, median of 8 steps, mean of 2 core-swapped rounds')"
