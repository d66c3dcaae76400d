"""Triton gated cross-attention (norm -> attention -> gated residual) against the reference.

Every case checks the output and the gradients of x, A, both norm parameters, the three
weights and alpha with the error-ratio criterion, in both evaluation orders.
"""

from __future__ import annotations

import math

import pytest
import torch

from deepmlf_fast.ops.cross_attention import gated_cross_attention, gated_cross_attention_reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

FP32, BF16 = torch.float32, torch.bfloat16
DKV = 30  # DeepMLF's AV width
NAMES = ("x", "av", "norm_weight", "norm_bias", "w_q", "w_kv", "w_o", "alpha")


def _params(bsz, n_q, n_kv, dim, *, norm="layernorm", per_channel=False, dtype=FP32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    params = dict(
        x=rnd(bsz, n_q, dim), av=rnd(bsz, n_kv, DKV),
        norm_weight=1 + rnd(dim, scale=0.1), norm_bias=rnd(dim, scale=0.1) if norm == "layernorm" else None,
        w_q=rnd(dim, dim, scale=dim**-0.5), w_kv=rnd(2 * dim, DKV, scale=DKV**-0.5),
        w_o=rnd(dim, dim, scale=dim**-0.5),
        alpha=torch.randn(dim if per_channel else 1, generator=g).to(device),  # fp32 gate parameter
    )
    return params, rnd(bsz, n_q, dim)


def _fwd_bwd(fn, params, dout, **kw):
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in params.items()}
    out = fn(*leaves.values(), **kw)
    live = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in live], dout)
    return {"out": out, **{f"d{k}": g for k, g in zip(live, grads)}}


def _kernel(params, dout, seed=None, **kw):
    from deepmlf_fast.ops.cross_attention import gated_cross_attention_triton

    return _fwd_bwd(gated_cross_attention_triton, params, dout, seed=seed, **kw)


def _check(assert_fa_close, params, dout, **kw):
    """Kernel vs reference in the same dtype vs reference in fp64, replaying the dropout."""
    from deepmlf_fast.ops.cross_attention import gated_cross_attention_dropout_masks

    seed = torch.tensor([11, 12], dtype=torch.int64, device=dout.device)
    kernel = _kernel(params, dout, seed=seed, **kw)
    bsz, n_q, dim = params["x"].shape
    attn_mask, resid_mask = gated_cross_attention_dropout_masks(
        seed, bsz, n_q, params["av"].shape[1], dim, kw["n_heads"], kw.get("dropout_p", 0.0),
        kw.get("resid_dropout_p", 0.0),
    )
    ref_kw = dict(kw, attn_dropout_mask=attn_mask, resid_dropout_mask=resid_mask)
    lowprec = _fwd_bwd(gated_cross_attention_reference, params, dout, **ref_kw)
    params64 = {k: None if v is None else v.double() for k, v in params.items()}
    exact = _fwd_bwd(gated_cross_attention_reference, params64, dout.double(), **ref_kw)
    for name in kernel:
        assert_fa_close(name, kernel[name], lowprec[name], exact[name])
    return kernel


CASES = {
    # name: (B, F, L, D, H, av_lengths, dtype, options)
    "plain-fp32": (2, 8, 50, 64, 4, [50, 17], FP32, dict(form="plain")),
    "absorbed-bf16-rms-tanh-channel-official-scale": (
        3, 8, 40, 64, 4, [1, 0, 33], BF16,
        dict(form="absorbed", norm="rmsnorm", gate="tanh", per_channel=True, scale=1 / math.sqrt(64)),
    ),
    "plain-bf16-F20-L65-dh48": (2, 20, 65, 96, 2, [65, 0], BF16, dict(form="plain", gate="tanh", per_channel=True)),
    "absorbed-fp32-F20-L65": (2, 20, 65, 64, 4, [3, 65], FP32, dict(form="absorbed", scale=1 / math.sqrt(64))),
    "absorbed-F1-L1-B1": (1, 1, 1, 64, 4, None, FP32, dict(form="absorbed", norm="rmsnorm")),
    "plain-F1-L1-B1": (1, 1, 1, 64, 4, None, BF16, dict(form="plain")),
    "plain-empty-av": (2, 4, 0, 64, 4, None, FP32, dict(form="plain", per_channel=True)),
    "absorbed-empty-av": (2, 4, 0, 64, 4, [0, 0], BF16, dict(form="absorbed")),
}


def _case(name, device):
    bsz, n_q, n_kv, dim, heads, lengths, dtype, opts = CASES[name]
    opts = dict(opts)
    params, dout = _params(bsz, n_q, n_kv, dim, norm=opts.get("norm", "layernorm"),
                           per_channel=opts.pop("per_channel", False), dtype=dtype, device=device)
    av_lengths = None if lengths is None else torch.tensor(lengths, device=device)
    return params, dout, dict(opts, n_heads=heads, av_lengths=av_lengths)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(device, assert_fa_close, name):
    params, dout, kw = _case(name, device)
    _check(assert_fa_close, params, dout, **kw)


@pytest.mark.parametrize("form, dtype", [("plain", FP32), ("absorbed", BF16)])
def test_dropout_replays_through_reference(device, assert_fa_close, form, dtype):
    params, dout = _params(2, 8, 50, 64, per_channel=True, dtype=dtype, device=device)
    _check(assert_fa_close, params, dout, n_heads=4, form=form, gate="tanh", dropout_p=0.1, resid_dropout_p=0.2,
           av_lengths=torch.tensor([50, 9], device=device))


def test_plain_and_absorbed_compute_the_same_function(device):
    params, dout = _params(2, 8, 33, 64, per_channel=True, device=device)
    kw = dict(n_heads=4, av_lengths=torch.tensor([33, 5], device=device))
    plain = _kernel(params, dout, form="plain", **kw)
    absorbed = _kernel(params, dout, form="absorbed", **kw)
    for name in plain:
        torch.testing.assert_close(plain[name], absorbed[name], rtol=1e-4, atol=1e-5, msg=name)


def test_samples_without_av_pass_x_through(device):
    """av_lengths == 0: out == x exactly, dx == dout, no gradient reaches that sample's A,
    and a batch with only such samples gives zero weight and gate gradients."""
    params, dout = _params(3, 5, 9, 64, device=device)
    grads = _kernel(params, dout, n_heads=4, form="absorbed", av_lengths=torch.tensor([9, 0, 4], device=device))
    assert torch.equal(grads["out"][1], params["x"][1])
    assert torch.equal(grads["dx"][1], dout[1])
    assert grads["dav"][1].abs().max() == 0 and grads["dav"][2, 4:].abs().max() == 0
    blind = _kernel(params, dout, n_heads=4, form="plain", av_lengths=torch.zeros(3, device=device))
    assert torch.equal(blind["out"], params["x"]) and torch.equal(blind["dx"], dout)
    for name in ("dav", "dnorm_weight", "dnorm_bias", "dw_q", "dw_kv", "dw_o", "dalpha"):
        assert blind[name].abs().max() == 0, name


class _LaunchCounter:
    """Stands in for a kernel object and counts `kernel[grid](...)` launches."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(getattr(self.kernel, "__name__", type(self.kernel).__name__))
        return self.kernel[grid]


def test_attention_gate_and_residual_take_two_launches(device, monkeypatch):
    from deepmlf_kernels import attention, gated_linear

    log = []
    for module in (attention, gated_linear):
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _LaunchCounter(getattr(module, name), log))
    params, dout = _params(2, 8, 20, 64, device=device)
    leaves = {k: v.requires_grad_() for k, v in params.items()}
    out = gated_cross_attention(*leaves.values(), n_heads=4, dropout_p=0.1, resid_dropout_p=0.1, form="absorbed",
                                backend="triton")
    assert len(log) == 2, log  # attention kernel + gated-linear GEMM epilogue
    out.backward(dout)
    assert len(log) == 2 + 4, log  # preprocess, dK/dV, dQ, gated-linear backward


def test_repeated_runs_bitwise_identical(device):
    params, dout = _params(2, 20, 65, 64, per_channel=True, dtype=BF16, device=device)
    seed = torch.tensor([1, 2], dtype=torch.int64, device=device)
    kw = dict(n_heads=4, form="absorbed", dropout_p=0.1, resid_dropout_p=0.1, seed=seed,
              av_lengths=torch.tensor([65, 30], device=device))
    first, second = _kernel(params, dout, **kw), _kernel(params, dout, **kw)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_public_op_routes_to_triton(device):
    params, _ = _params(2, 4, 10, 64, device=device)
    torch.manual_seed(0)
    via_op = gated_cross_attention(*params.values(), n_heads=4, dropout_p=0.2, backend="triton")
    from deepmlf_fast.ops.cross_attention import gated_cross_attention_triton
    from deepmlf_fast.ops.cross_attention import choose_form

    torch.manual_seed(0)
    direct = gated_cross_attention_triton(*params.values(), n_heads=4, dropout_p=0.2,
                                          form=choose_form(2, 4, 10, 64, 4, DKV))
    assert torch.equal(via_op, direct)


@pytest.mark.parametrize("form, gate, per_channel", [("plain", "sigmoid", False), ("absorbed", "tanh", True)])
def test_reference_gradcheck(form, gate, per_channel):
    """The oracle itself, fp64, with a sample that has no AV step and fixed dropout masks."""
    g = torch.Generator().manual_seed(0)
    bsz, n_q, n_kv, dim, dkv, heads = 2, 2, 3, 8, 3, 2

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    inputs = (rnd(bsz, n_q, dim), rnd(bsz, n_kv, dkv), rnd(dim), rnd(dim), rnd(dim, dim), rnd(2 * dim, dkv),
              rnd(dim, dim), rnd(dim if per_channel else 1))
    attn_mask = torch.rand(bsz, heads, n_q, n_kv, generator=g) > 0.2
    resid_mask = torch.rand(bsz, n_q, dim, generator=g) > 0.2

    def fn(*args):
        return gated_cross_attention_reference(
            *args, n_heads=heads, gate=gate, form=form, av_lengths=torch.tensor([3, 0]), dropout_p=0.2,
            resid_dropout_p=0.2, attn_dropout_mask=attn_mask, resid_dropout_mask=resid_mask,
        )

    assert torch.autograd.gradcheck(fn, inputs)
