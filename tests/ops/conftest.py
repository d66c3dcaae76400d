"""Shared setup for the op tests: where the Triton kernels run, and the error criterion.

Without a GPU the kernels run on CPU tensors through Triton's interpreter. TRITON_INTERPRET
must be set before any `@triton.jit` function is defined, i.e. before
`deepmlf_kernels` is first imported; this conftest is imported before the test
modules of this folder, and nothing outside `deepmlf_fast.ops`' Triton branch imports the
kernels. The variable only changes what `@triton.jit` returns (torch's inductor compiles
CPU code in C++), so setting it for the whole process leaves other tests alone.

With a GPU the kernels run for real on CUDA tensors. `@triton.jit` chooses interpreter or
compiler once, when a kernel is defined, so one process tests one of the two; run
`TRITON_INTERPRET=1 pytest tests/ops` on a GPU machine to test the CPU path there.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

# Headroom over the low-precision reference's own error (FlashAttention's tests use 2),
# plus an absolute floor for values that the references get exactly right.
ERROR_RATIO = 3.0
ABS_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}


@pytest.fixture
def device() -> str:
    """"cuda" when the kernels are compiled, "cpu" when interpreted; skips without triton."""
    triton = pytest.importorskip("triton")
    if DEVICE == "cpu" and not triton.knobs.runtime.interpret:
        pytest.skip("deepmlf_kernels was imported before TRITON_INTERPRET=1 was set")
    return DEVICE


@pytest.fixture
def assert_fa_close():
    """FlashAttention's error-ratio check, one call per output or gradient:

        max|kernel - ref_fp64| <= ERROR_RATIO * max|ref_lowprec - ref_fp64| + floor

    `ref_lowprec` is the PyTorch reference run in the kernel's input dtype, so the bound
    scales with what that precision can achieve on this very input.
    """

    def check(name: str, kernel: torch.Tensor, ref_lowprec: torch.Tensor, ref_fp64: torch.Tensor) -> None:
        assert kernel.shape == ref_fp64.shape, f"{name}: shape {tuple(kernel.shape)} vs {tuple(ref_fp64.shape)}"
        assert torch.isfinite(kernel).all(), f"{name}: non-finite values"
        err = (kernel.double() - ref_fp64).abs().max().item() if kernel.numel() else 0.0
        base = (ref_lowprec.double() - ref_fp64).abs().max().item() if kernel.numel() else 0.0
        bound = ERROR_RATIO * base + ABS_FLOOR[ref_lowprec.dtype]
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (reference in {ref_lowprec.dtype}: {base:.3g})"

    return check
