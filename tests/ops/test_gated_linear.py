"""Triton gated residual linear `x + g * dropout(h @ W^T)` against PyTorch; g = gate(alpha) is
formed by `deepmlf_fast.ops.gate` in both, so alpha's gradient flows through it."""

from __future__ import annotations

import pytest
import torch

from deepmlf_fast.ops.gate import gate_value

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

FP32, BF16 = torch.float32, torch.bfloat16


def _reference(x, h, w, alpha, gate, dropout_p, keep):
    y = h @ w.t()
    if keep is not None:
        y = y * keep.to(y.dtype) / (1.0 - dropout_p)
    g = torch.sigmoid(alpha) if gate == "sigmoid" else torch.tanh(alpha)
    return x + g.to(x.dtype) * y


def _kernel(x, h, w, alpha, gate="sigmoid", **kw):
    from deepmlf_kernels.gated_linear import gated_linear

    return gated_linear(x, h, w, gate_value(alpha, gate), **kw)


def _inputs(m, n, k, per_channel, dtype, device, alpha_zero=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, n, generator=g).to(device, dtype)
    h = torch.randn(m, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    alpha = torch.randn(n if per_channel else 1, generator=g).to(device)  # fp32 parameter
    if alpha_zero:
        alpha.zero_()
    dout = torch.randn(m, n, generator=g).to(device, dtype)
    return [x, h, w, alpha], dout


def _fwd_bwd(fn, tensors, dout, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, **kw)
    return [out, *torch.autograd.grad(out, leaves, dout)]


@pytest.mark.parametrize(
    "dtype, gate, per_channel, dropout_p",
    [
        (FP32, "sigmoid", False, 0.0),
        (FP32, "tanh", True, 0.25),
        (BF16, "sigmoid", True, 0.0),
        (BF16, "tanh", False, 0.1),
    ],
)
def test_matches_reference(device, assert_fa_close, dtype, gate, per_channel, dropout_p):
    from deepmlf_kernels.gated_linear import gated_linear_dropout_mask

    m, n, k = 45, 72, 100  # none a multiple of the tiles
    tensors, dout = _inputs(m, n, k, per_channel, dtype, device)
    seed = torch.tensor([9], dtype=torch.int64, device=device)
    kernel = _fwd_bwd(_kernel, tensors, dout, gate=gate, dropout_p=dropout_p, seed=seed)
    keep = gated_linear_dropout_mask(seed, m, n, dropout_p) if dropout_p > 0 else None
    ref = dict(gate=gate, dropout_p=dropout_p, keep=keep)
    lowprec = _fwd_bwd(_reference, tensors, dout, **ref)
    exact = _fwd_bwd(_reference, [t.double() for t in tensors], dout.double(), **ref)
    for name, a, b, c in zip(("out", "dx", "dh", "dw", "dalpha"), kernel, lowprec, exact):
        assert_fa_close(name, a, b, c)


def test_tanh_gate_at_zero_still_learns(device):
    """tanh(0) = 0 makes out == x, yet d(alpha) = sum(dY * y) must not vanish: the reason
    the kernel keeps y instead of recovering it from out - x."""
    tensors, dout = _inputs(8, 32, 16, False, FP32, device, alpha_zero=True)
    out, dx, dh, dw, dalpha = _fwd_bwd(_kernel, tensors, dout, gate="tanh")
    assert torch.equal(out, tensors[0])
    assert dh.abs().max() == 0 and dw.abs().max() == 0
    expected = (dout * (tensors[1] @ tensors[2].t())).sum().reshape(1)
    torch.testing.assert_close(dalpha, expected, rtol=1e-5, atol=1e-5)


def test_leading_dims_and_keep_rate(device):
    from deepmlf_kernels.gated_linear import gated_linear, gated_linear_dropout_mask

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 24, generator=g).to(device)
    h = torch.randn(2, 5, 16, generator=g).to(device)
    w = torch.randn(24, 16, generator=g).to(device)
    out = gated_linear(x, h, w, torch.full((), 0.5, device=device))
    torch.testing.assert_close(out, x + 0.5 * (h @ w.t()), rtol=1e-5, atol=1e-5)
    keep = gated_linear_dropout_mask(torch.tensor([3], device=device), 256, 128, 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.015  # 32k draws: 5 standard deviations


def test_repeated_runs_bitwise_identical(device):
    tensors, dout = _inputs(130, 72, 40, True, BF16, device)
    seed = torch.tensor([4], dtype=torch.int64, device=device)
    runs = [_fwd_bwd(_kernel, tensors, dout, gate="sigmoid", dropout_p=0.1, seed=seed) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_rejects_mixed_dtypes(device):
    from deepmlf_kernels.gated_linear import gated_linear

    x = torch.randn(4, 8, device=device)
    with pytest.raises(TypeError, match="share a dtype"):
        gated_linear(x, x.to(torch.float16), torch.randn(8, 8, device=device), torch.zeros(1, device=device))
