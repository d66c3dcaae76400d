"""The kernels' arithmetic helpers and the fp32 dot precision (`deepmlf_kernels.common`).

Under the interpreter `_round` must narrow exactly as the GPU does (round to nearest
even) and `_dot` must compute what the tensor cores compute for each operand dtype and
fp32 precision; the launchers must pass the precision PyTorch's cuBLAS setting selects,
read at every launch.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
triton = pytest.importorskip("triton")
tl = triton.language
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16

from deepmlf_kernels.common import INTERPRET, _dot, _round, dot_precision  # noqa: E402  (after conftest's TRITON_INTERPRET)


@triton.jit
def _round_kernel(X, Y, N: tl.constexpr, UPCAST: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, _round(tl.load(X + offs), Y.dtype.element_ty, UPCAST))


@triton.jit
def _dot_kernel(A, B, C, N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    tile = tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(C + tile, _dot(tl.load(A + tile), tl.load(B + tile), DOT_PRECISION, UPCAST))


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy's fp16 cast, as meant
def test_round_is_round_to_nearest_even(device, dtype):
    """Every magnitude, exact ties (1 + half an ulp, 1 + 3 half-ulps), overflow, inf, NaN."""
    g = torch.Generator().manual_seed(0)
    ulp = 2.0**-7 if dtype == BF16 else 2.0**-10
    special = [1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 1 + ulp / 2 + 2**-20, 3.3e38, 65520.0, 1e-42,
               float("inf"), float("-inf"), float("nan")]
    x = torch.randn(4096, generator=g) * torch.logspace(-40, 38, 4096)
    x[: len(special)] = torch.tensor(special)
    y = torch.empty(4096, dtype=dtype, device=device)
    _round_kernel[(1,)](x.to(device), y, 4096, UPCAST=INTERPRET)
    y = y.cpu()
    expected = x.to(dtype)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y[~y.isnan()], expected[~expected.isnan()])


def test_dot_rejects_operands_of_different_dtypes(device):
    """As the GPU compiler does: a P or dS that was not narrowed to V's / K's dtype fails."""
    a = torch.randn(16, 16, device=device)
    with pytest.raises(Exception, match="share a dtype"):
        _dot_kernel[(1,)](a, a.to(BF16), torch.empty_like(a), 16, DOT_PRECISION=None, UPCAST=INTERPRET)


@pytest.mark.parametrize("precision, max_rel", [("ieee", 1e-6), ("tf32x3", 1e-6), ("tf32", 2e-3)])
def test_fp32_dot_precision(device, precision, max_rel):
    """fp32 dots are fp32-accurate in IEEE and 3xTF32, about 1e-3 relative in TF32 (10-bit
    operand mantissas); the interpreter emulates the operand rounding of each."""
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(64, 64, generator=g) for _ in range(2))
    c = torch.empty(64, 64, device=device)
    _dot_kernel[(1,)](a.to(device), b.to(device), c, 64, DOT_PRECISION=precision, UPCAST=INTERPRET)
    exact = a.double() @ b.double()
    rel = ((c.cpu().double() - exact).abs().max() / exact.abs().max()).item()
    assert rel < max_rel
    if precision == "tf32":
        assert rel > 1e-5  # really rounded to tf32, not computed in fp32


@pytest.fixture
def restore_matmul_precision():
    """Put PyTorch's fp32 matmul setting back as it was (through the new API, which the
    legacy `allow_tf32` may be read after only if its value is the original one)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision, torch.get_float32_matmul_precision()
    yield matmul
    torch.set_float32_matmul_precision(before[1])
    matmul.fp32_precision = before[0]


@pytest.mark.parametrize(
    "setting, expected",
    [
        (None, "tf32x3"),
        ("allow_tf32", "tf32"),
        ("fp32_precision=tf32", "tf32"),
        ("fp32_precision=ieee", "tf32x3"),
        ("matmul_precision=high", "tf32"),
        ("matmul_precision=highest", "tf32x3"),
    ],
)
def test_dot_precision_follows_cublas_setting(restore_matmul_precision, setting, expected):
    matmul = restore_matmul_precision
    if setting == "allow_tf32":
        matmul.allow_tf32 = True
    elif setting is not None:
        api, value = setting.split("=")
        if api == "fp32_precision":
            matmul.fp32_precision = value
        else:
            torch.set_float32_matmul_precision(value)
    assert dot_precision(FP32) == expected
    assert dot_precision(BF16) is None and dot_precision(FP16) is None


def test_launchers_read_the_precision_at_each_launch(device, restore_matmul_precision):
    """Turning TF32 on between two calls changes the fp32 kernels' result (coarser, still
    close), and leaves bf16 results bitwise alone."""
    from deepmlf_kernels.attention import varlen_attention_triton
    from deepmlf_kernels.gated_linear import gated_linear

    g = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 20], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(20, 2, 32, generator=g).to(device) for _ in range(3))
    x, h = torch.randn(20, 48, generator=g).to(device), torch.randn(20, 64, generator=g).to(device)
    w, gate = torch.randn(48, 64, generator=g).to(device), torch.full((1,), 0.5, device=device)

    def run(dtype):
        return (varlen_attention_triton(q.to(dtype), k.to(dtype), v.to(dtype), cu, cu, 20, 20),
                gated_linear(x.to(dtype), h.to(dtype), w.to(dtype), gate))

    accurate, low_prec = run(FP32), run(BF16)
    restore_matmul_precision.fp32_precision = "tf32"
    tf32, low_prec_tf32 = run(FP32), run(BF16)
    for a, b in zip(accurate, tf32):
        assert not torch.equal(a, b)
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    for a, b in zip(low_prec, low_prec_tf32):
        assert torch.equal(a, b)
