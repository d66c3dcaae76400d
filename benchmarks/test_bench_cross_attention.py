"""Gated cross-attention microbenchmark: one MM block's fusion tokens (F queries) against the AV
sequence (L_av steps of width 30), pre-norm, projections, softmax, output projection, sigmoid gate
and residual — the whole `gated_cross_attention` op.

Providers (same weights, same inputs, softmax scale 1/sqrt(D) as the official code):

    eager_official      baselines/official_xattn.py: separate nn.Linear layers, explicit softmax
    sdpa                the same module with the attention core on F.scaled_dot_product_attention
    reference           gated_cross_attention(backend="reference", form="plain")
    reference_absorbed  gated_cross_attention(backend="reference", form="absorbed")
    triton              gated_cross_attention(backend="triton", form="plain")      CUDA only
    triton_absorbed     gated_cross_attention(backend="triton", form="absorbed")   CUDA only

Modes: `forward` (autograd recording on, as in training), `backward` (gradients of x, A and every
weight from a stored forward, `torch.autograd.grad(..., retain_graph=True)`), `fwd+bwd`.
Every forward is checked against the reference before it is timed, and in the backward modes
every gradient the timed callable returns (x, A and each weight), once, outside the timing, against
the reference's in the benchmark dtype and in `BenchEnv.exact_dtype` (the `check_gradients` fixture),
so a wrong provider fails instead of posting a fast number.

FLOP convention: the model FLOPs of the plain evaluation order, the same count for every
provider (the absorbed order does different arithmetic for the same function):
    fwd = 2·B·F·D² (Q) + 2·B·L·Dkv·2D (K/V) + 4·B·H·F·L·Dh (QKᵀ and PV, FA convention) + 2·B·F·D² (O)
    bwd = 2 × the GEMM terms + 2.5 × the attention term (FA convention);  fwd+bwd = fwd + bwd.
Byte convention: the minimum an op must move at the benchmark dtype, with K and V never
materialised (they are a function of the 30-wide A):
    fwd = read x, A, weights (W_q, W_kv, W_o, norm, alpha) + write out
    bwd = read x, A, weights, d_out + write dx, dA, d_weights;  fwd+bwd = fwd + bwd.
At Llama-7B width the D×D weights dominate these bytes; the op is memory-bound (arithmetic
intensity ≈ F), so GB/s and % roofline are the columns to read.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from baselines.official_xattn import OfficialGatedCrossAttention, SDPAGatedCrossAttention
from deepmlf_fast.ops.cross_attention import gated_cross_attention
from shapes import CrossAttnShape

SUITE = "cross_attention"
PROVIDERS = ("eager_official", "sdpa", "reference", "reference_absorbed", "triton", "triton_absorbed")
MODES = ("forward", "backward", "fwd+bwd")
CUDA_ONLY = {"triton", "triton_absorbed"}


def triton_cross_attention_available() -> str | None:
    """None when the Triton cross-attention can run here, else the reason it cannot."""
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec("deepmlf_kernels") is None:
        return "deepmlf_kernels is not importable"
    return None


def make_inputs(shape: CrossAttnShape, device, dtype, seed: int = 0) -> dict:
    """Seeded inputs and weights of one shape; tensors that DeepMLF trains require grad."""
    d = shape.dims
    g = torch.Generator().manual_seed(seed)

    def rnd(*size, std=1.0):
        return (torch.randn(*size, generator=g) * std).to(device=device, dtype=dtype).requires_grad_()

    dim, dkv = d.d_model, d.av_dim
    return dict(
        x=rnd(shape.batch, shape.n_fusion, dim),
        av=rnd(shape.batch, shape.av_len, dkv),
        norm_weight=(1.0 + rnd(dim, std=0.1)).detach().requires_grad_(),
        norm_bias=rnd(dim, std=0.1) if d.norm == "layernorm" else None,
        w_q=rnd(dim, dim, std=dim**-0.5),
        w_kv=rnd(2 * dim, dkv, std=dkv**-0.5),
        w_o=rnd(dim, dim, std=dim**-0.5),
        alpha=rnd(1, std=0.5),
    )


GRAD_NAMES = ("x", "av", "norm_weight", "norm_bias", "w_q", "w_kv", "w_o", "alpha")
"""What the backward differentiates, in the order of every provider's tensors (norm_bias only
with a LayerNorm)."""


def reference_gradients(shape: CrossAttnShape, inp: dict, dout: torch.Tensor, dtype: torch.dtype):
    """Gradients (in `GRAD_NAMES` order) of the reference provider run in `dtype`."""
    copy = {k: None if t is None else t.detach().to(dtype).requires_grad_() for k, t in inp.items()}
    fwd, leaves = build_provider("reference", shape, copy)
    return torch.autograd.grad(fwd(), leaves, dout.to(dtype))


def build_provider(provider: str, shape: CrossAttnShape, inp: dict):
    """-> (forward callable, tensors whose gradients the backward computes, `GRAD_NAMES` order)."""
    d = shape.dims
    scale = d.d_model**-0.5  # official 1/sqrt(D)
    eps = 1e-5
    if provider in ("eager_official", "sdpa"):
        cls = OfficialGatedCrossAttention if provider == "eager_official" else SDPAGatedCrossAttention
        mod = cls(d.d_model, d.av_dim, d.mm_heads, norm=d.norm, eps=eps, scale=scale)
        mod = mod.to(device=inp["x"].device, dtype=inp["x"].dtype)
        mod.load_weights(*(inp[k] for k in ("norm_weight", "norm_bias", "w_q", "w_kv", "w_o", "alpha")))
        x, av = inp["x"], inp["av"]
        weights = [mod.norm.weight, getattr(mod.norm, "bias", None), mod.w_q.weight, mod.w_kv.weight, mod.w_o.weight,
                   mod.alpha]
        return (lambda: mod(x, av)), [x, av, *(w for w in weights if w is not None)]
    backend = "triton" if provider.startswith("triton") else "reference"
    form = "absorbed" if provider.endswith("absorbed") else "plain"
    args = [inp[k] for k in GRAD_NAMES]

    def fwd():
        return gated_cross_attention(
            *args, n_heads=d.mm_heads, norm=d.norm, norm_eps=eps, gate="sigmoid", scale=scale,
            form=form, backend=backend,
        )

    return fwd, [t for t in args if t is not None]


def flops_bytes(shape: CrossAttnShape, mode: str, elem: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one call under the module docstring's conventions."""
    d = shape.dims
    b, f, lav, dim, dkv, h = shape.batch, shape.n_fusion, shape.av_len, d.d_model, d.av_dim, d.mm_heads
    gemm = 2 * b * f * dim * dim * 2 + 2 * b * lav * dkv * 2 * dim
    attn = 4 * b * h * f * lav * (dim // h)
    fwd_flops, bwd_flops = gemm + attn, 2 * gemm + 2.5 * attn
    x, a = b * f * dim, b * lav * dkv
    w = 2 * dim * dim + 2 * dim * dkv + (2 * dim if d.norm == "layernorm" else dim) + 1
    fwd_bytes, bwd_bytes = elem * (2 * x + a + w), elem * (3 * x + 2 * a + 2 * w)
    return {
        "forward": (fwd_flops, fwd_bytes),
        "backward": (bwd_flops, bwd_bytes),
        "fwd+bwd": (fwd_flops + bwd_flops, fwd_bytes + bwd_bytes),
    }[mode]


def _check_forward(out: torch.Tensor, ref: torch.Tensor, provider: str) -> None:
    tol = 1e-4 if out.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol, msg=lambda m: f"{provider}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cross_attention(xattn_shape: CrossAttnShape, provider: str, mode: str, bench_env, measure,
                         check_gradients):
    device = bench_env.device.torch_device
    if provider in CUDA_ONLY:
        reason = triton_cross_attention_available()
        if reason or device.type != "cuda":
            pytest.skip(f"{provider}: {reason or 'runs on CUDA only'}")
    inp = make_inputs(xattn_shape, device, bench_env.dtype)
    fwd, grads_of = build_provider(provider, xattn_shape, inp)
    if mode == "forward":
        ref_fwd, _ = build_provider("reference", xattn_shape, inp)
        with torch.no_grad():
            _check_forward(fwd(), ref_fwd(), provider)
    dout = torch.randn(xattn_shape.batch, xattn_shape.n_fusion, xattn_shape.dims.d_model,
                       generator=torch.Generator().manual_seed(1)).to(device=device, dtype=bench_env.dtype)

    def make_fn():
        if mode == "forward":
            return fwd
        if mode == "backward":
            out = fwd()
            return lambda: torch.autograd.grad(out, grads_of, dout, retain_graph=True)
        return lambda: torch.autograd.grad(fwd(), grads_of, dout)

    if mode != "forward":  # the timed callable's gradients
        names = [n for n in GRAD_NAMES if inp[n] is not None]
        check_gradients(f"{provider} {mode}", names, make_fn()(),
                        reference_gradients(xattn_shape, inp, dout, bench_env.dtype),
                        reference_gradients(xattn_shape, inp, dout, bench_env.exact_dtype))
    flops, nbytes = flops_bytes(xattn_shape, mode, torch.finfo(bench_env.dtype).bits // 8)
    measure(make_fn, suite=SUITE, provider=provider, mode=mode, shape=xattn_shape.key, flops=flops, bytes=nbytes)
