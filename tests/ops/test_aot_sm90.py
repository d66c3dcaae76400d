"""Every Triton kernel compiles for H100 (sm_90) without a GPU.

The interpreter runs code the GPU compiler rejects (e.g. a tl.dot dimension < 16), so
the CPU tests alone do not prove the kernels build. `deepmlf_kernels.aot` compiles
the launchers' specialisations to cubin; it needs a process without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_all_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "deepmlf_kernels.aot"], env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "kernels compiled for sm_90" in proc.stdout
