#!/usr/bin/env bash
# CI: the learning test on a second arithmetic path, after the README's run (runs/demo) has been
# checked on the path `auto` took. The demo recipe trains again with another seed and the other
# precision where this CPU can run it at a useful speed:
#   auto took bf16            -> fp32 (every CPU runs it)
#   auto took fp32, the CPU has bf16 instructions (the probe found bf16 no faster) -> bf16
#   auto took fp32, no bf16 instructions (AVX2-only: bf16 is emulated, ~40x slower) -> fp32 again,
#     another seed on the same path
# then tests/train/test_learning.py checks that run (DEEPMLF_LEARNING_RUNS).
set -euo pipefail
cd "$(dirname "$0")/.."
taken=$(.venv/bin/python -c 'import json; print(json.load(open("runs/demo/config.json"))["resolved"]["precision"])')
other=$(.venv/bin/python - "$taken" <<'PY'
import sys
import torch
from deepmlf_fast.hardware import cpu_flags, cpu_native_bf16
if sys.argv[1] == "bf16":
    print("fp32")
else:
    native, _ = cpu_native_bf16(cpu_flags(), torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                torch.backends.cpu.get_cpu_capability())
    print("bf16" if native else "fp32")
PY
)
echo "learning test, second path: the README run took $taken; now precision $other, seed 1991"
.venv/bin/deepmlf -q train --precision "$other" --seeds 1991 --output-dir runs/demo-second-path --overwrite --no-report
DEEPMLF_LEARNING_RUNS=runs/demo-second-path .venv/bin/pytest -q tests/train/test_learning.py
