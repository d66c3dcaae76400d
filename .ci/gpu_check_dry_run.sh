#!/usr/bin/env bash
# CI: the GPU check's dry run, without a GPU. A fresh virtual environment holds only what the lent
# GPU machine's image holds of the check's needs (torch, triton, transformers and their stack, pytest,
# pytest-benchmark, pytest-xdist, and the image's packages deepspeed depends on), none of what the
# image lacks (deepspeed, bitsandbytes, gguf, the asset packages). Then, as before a device call:
#   1. scripts/gpu_carry.sh (with the project's .venv, which has the asset packages) builds the
#      carried folder: wheels for this environment's Python (the device gets 3.12 ones: pydantic-core
#      is the one version-specific wheel) and the saved tokenizers;
#   2. benchmarks/gpu_check.sh --dry-run installs the carried wheels with --no-index, checks every
#      import, builds the tiny backbones from the carried tokenizers, checks the carried size and
#      collects every test selection of the check.
# (For a device call, run scripts/gpu_carry.sh without GPU_CARRY_PYTHON_VERSION: Python 3.12 wheels.)
# Needs the project environment (scripts/install.sh). Environment: PYTHON (its interpreter, default
# .venv/bin/python), GPU_DRYRUN_VENV (default .cache/gpu-dryrun-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GPU_DRYRUN_VENV:-$PWD/.cache/gpu-dryrun-venv}"

rm -rf "$VENV"
python3 -m venv "$VENV"
# Versions: requirements.txt's pins where it has them (the image's own versions differ a little:
# torch 2.11 cu130 there); the rest at the project environment's versions.
mapfile -t pinned < <(grep -E "^(torch|triton|numpy|transformers|tokenizers|huggingface-hub|safetensors|accelerate|peft|pytest|pytest-benchmark|pytest-xdist|tqdm)==" requirements.txt)
# The constraint pins torch to the local CPU wheel: unpinned, pip would pull the CUDA build.
# --no-compile: byte-compiling all of torch costs more than compiling what the dry run imports.
PIP_CONSTRAINT="$PWD/constraints.txt" "$VENV/bin/python" -m pip install -q --no-compile "${pinned[@]}" \
  psutil==7.2.2 py-cpuinfo==9.0.0 msgpack==1.2.4 ninja==1.13.2 einops==0.8.2 packaging==26.4

venv_s=$SECONDS

venv_python="$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
PYTHON="${PYTHON:-$PWD/.venv/bin/python}" GPU_CARRY_PYTHON_VERSION="$venv_python" bash scripts/gpu_carry.sh
carry_s=$((SECONDS - venv_s))

PATH="$VENV/bin:$PATH" bash benchmarks/gpu_check.sh --dry-run
echo "gpu_check dry run (CI): environment ${venv_s}s, carry ${carry_s}s, dry run $((SECONDS - venv_s - carry_s))s"
