"""LM self-attention microbenchmark at DeepMLF's text + fusion shapes (T = L + F ≈ 58-70).

Each sample is `[its transcript (len_b tokens, the registry's fixed draw) ; F fusion tokens]`,
causal. The official code evaluates it padded to T = L + F with a dense causal + key-padding mask
(baselines/self_attention.py); deepmlf-fast packs the real rows (`varlen_attention`).

Providers:

    eager_masked      padded, explicit scores + additive dense mask, fp32 softmax (HF 'eager'; K/V
                      heads repeated for GQA)
    sdpa_dense        padded, F.scaled_dot_product_attention with the dense bool mask (HF 'sdpa')
    flex              padded, compiled FlexAttention with an equivalent BlockMask (built outside the
                      timing; at T <= 128 the whole sequence is one 128x128 block, so nothing is
                      skipped). CPU: forward only under no_grad (compiled Flex has no CPU backward)
    sdpa_unpadded     packed rows, one causal SDPA call per sample (NJT SDPA rejects is_causal)
    flash_varlen      flash_attn.flash_attn_varlen_func, CUDA + bf16/fp16, when flash-attn imports
    varlen_reference  ours, varlen_attention(backend="reference") (pad, masked SDPA, unpad)
    varlen_triton     ours, varlen_attention(backend="triton"), CUDA only

Inputs are identical across providers: the padded tensors hold the packed rows at their padded
positions (pad rows are random, as pad-token states are). Layout conversion is not timed; the
whole-step benchmark covers what padding costs around the attention. GQA appears with the Llama
presets that have it (tiny-llama 4/2, SmolLM2-135M 9/3).

Conventions (identical for every provider, so TFLOP/s is useful work per second):
    FLOPs: FA formula per sample on the real rows, 4·Hq·d·s_b²/2 (causal), s_b = len_b + F;
           backward 2.5× forward.
    bytes: fwd = read q, k, v + write o over the real rows;
           bwd = read q, k, v, o, d_o + write dq, dk, dv; fwd+bwd = fwd + bwd.
Each forward is checked against `varlen_attention` on the real rows before timing, and in the
backward modes the gradients of q, k and v on the real rows, once, outside the timing (the
`check_gradients` fixture: against the reference in the benchmark dtype and in
`BenchEnv.exact_dtype`).
The output gradient is the same for every provider: a fixed draw on the real rows, zero on the
pad rows of the padded layouts (their outputs are discarded, as in the model).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from baselines.self_attention import (
    additive_mask,
    eager_masked_attention,
    flex_mask_mod,
    padded_visibility,
    sdpa_dense_attention,
    sdpa_per_sample,
)
from deepmlf_fast.ops.attention import varlen_attention
from shapes import SelfAttnShape

SUITE = "self_attention"
PROVIDERS = (
    "eager_masked", "sdpa_dense", "flex", "sdpa_unpadded", "flash_varlen", "varlen_reference", "varlen_triton",
)
MODES = ("forward", "backward", "fwd+bwd")
PADDED = {"eager_masked", "sdpa_dense", "flex"}


class Inputs:
    """Packed and padded q/k/v of one shape holding the same real rows."""

    def __init__(self, shape: SelfAttnShape, device, dtype, seed: int = 0):
        d = shape.dims
        self.shape = shape
        g = torch.Generator().manual_seed(seed)
        lens = shape.lengths
        bsz, t, f, text_len = shape.batch, shape.padded_len, shape.n_fusion, d.text_len
        seq = [n + f for n in lens]
        self.cu = [0]
        for s in seq:
            self.cu.append(self.cu[-1] + s)
        n_rows = self.cu[-1]
        self.cu_t = torch.tensor(self.cu, dtype=torch.int32, device=device)
        self.max_seqlen = max(seq)
        # Packed row r of sample b sits at padded position p: text 0..len-1, fusion L..L+F-1.
        b_idx, pos = [], []
        for b, n in enumerate(lens):
            b_idx += [b] * (n + f)
            pos += list(range(n)) + list(range(text_len, text_len + f))
        self.b_idx = torch.tensor(b_idx, device=device)
        self.pos = torch.tensor(pos, device=device)
        self.lengths = torch.tensor(lens, device=device)

        def make(heads):
            packed = torch.randn(n_rows, heads, d.head_dim, generator=g)
            padded = torch.randn(bsz, t, heads, d.head_dim, generator=g)
            padded[self.b_idx.cpu(), self.pos.cpu()] = packed
            as_leaf = lambda x: x.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
            return as_leaf(packed), as_leaf(padded.transpose(1, 2).contiguous())  # (N,H,d), (B,H,T,d)

        (self.q, self.qp), (self.k, self.kp) = make(d.n_heads), make(d.n_kv_heads)
        self.v, self.vp = make(d.n_kv_heads)
        self.visible = padded_visibility(self.lengths, text_len, f)
        # The output gradient of the backward modes, on the real rows only.
        self.dout = torch.randn(n_rows, d.n_heads, d.head_dim, generator=g).to(device=device, dtype=dtype)
        dout_padded = torch.zeros(bsz, t, d.n_heads, d.head_dim, device=device, dtype=dtype)
        dout_padded[self.b_idx, self.pos] = self.dout
        self.dout_padded = dout_padded.transpose(1, 2).contiguous()  # (B, H, T, d), zero on pad rows

    def padded_to_packed(self, out: torch.Tensor) -> torch.Tensor:
        """`(B, H, T, d)` output -> `(N, H, d)` real rows."""
        return out.transpose(1, 2)[self.b_idx, self.pos]

    def reference_gradients(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """dq, dk, dv `(N, H, d)` of `varlen_attention(backend="reference")` run in `dtype`."""
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in (self.q, self.k, self.v))
        out = varlen_attention(q, k, v, self.cu_t, self.cu_t, self.max_seqlen, self.max_seqlen, causal=True,
                               backend="reference")
        return torch.autograd.grad(out, (q, k, v), self.dout.to(dtype))


def provider_unavailable(provider: str, device: torch.device, dtype: torch.dtype, mode: str) -> str | None:
    """Reason a provider cannot run this case, or None."""
    if provider == "flash_varlen":
        if device.type != "cuda":
            return "flash-attn runs on CUDA only"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed"
        if dtype not in (torch.bfloat16, torch.float16):
            return "flash-attn needs bf16/fp16"
    if provider == "varlen_triton":
        if device.type != "cuda":
            return "Triton kernels run on CUDA only here"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
    if provider == "flex" and device.type == "cpu" and mode != "forward":
        return "compiled FlexAttention has no CPU backward"
    return None


_FLEX_COMPILED = None


def _compiled_flex():
    """One compiled flex_attention for the session; one recompilation per shape."""
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # Every registry shape recompiles; keep all of them rather than silently falling back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def build_provider(provider: str, inp: Inputs, training: bool):
    """-> (forward callable returning packed real rows or padded output, grad leaves, to_packed)."""
    shape, d = inp.shape, inp.shape.dims
    gqa = d.n_heads != d.n_kv_heads
    ident = lambda o: o  # noqa: E731
    padded = [inp.qp, inp.kp, inp.vp]
    if provider == "eager_masked":
        mask = additive_mask(inp.visible, inp.q.dtype)
        return (lambda: eager_masked_attention(*padded, mask)), padded, inp.padded_to_packed
    if provider == "sdpa_dense":
        return (lambda: sdpa_dense_attention(*padded, inp.visible)), padded, inp.padded_to_packed
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        flex = _compiled_flex()
        t = shape.padded_len
        block_mask = create_block_mask(
            flex_mask_mod(inp.lengths, d.text_len), shape.batch, None, t, t, device=inp.q.device.type,
        )

        # Without training, Flex must see tensors that do not require grad (the CPU path refuses them
        # even under no_grad).
        q, k, v = (inp.qp, inp.kp, inp.vp) if training else (inp.qp.detach(), inp.kp.detach(), inp.vp.detach())

        def fwd():
            if training:
                return flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)
            with torch.no_grad():
                return flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)

        return fwd, [inp.qp, inp.kp, inp.vp], inp.padded_to_packed
    if provider == "sdpa_unpadded":
        return (lambda: sdpa_per_sample(inp.q, inp.k, inp.v, inp.cu)), [inp.q, inp.k, inp.v], ident
    if provider == "flash_varlen":
        from flash_attn import flash_attn_varlen_func

        def fwd():
            return flash_attn_varlen_func(
                inp.q, inp.k, inp.v, inp.cu_t, inp.cu_t, inp.max_seqlen, inp.max_seqlen, causal=True,
            )

        return fwd, [inp.q, inp.k, inp.v], ident
    backend = "triton" if provider == "varlen_triton" else "reference"

    def fwd():
        return varlen_attention(
            inp.q, inp.k, inp.v, inp.cu_t, inp.cu_t, inp.max_seqlen, inp.max_seqlen, causal=True, backend=backend,
        )

    return fwd, [inp.q, inp.k, inp.v], ident


def flops_bytes(shape: SelfAttnShape, mode: str, elem: int) -> tuple[float, float]:
    """(FLOPs, bytes) under the module docstring's conventions."""
    d = shape.dims
    fwd_flops = sum(4 * d.n_heads * d.head_dim * s * s / 2 for s in shape.seq_lens)
    rows = sum(shape.seq_lens)
    per_row = rows * d.head_dim * elem
    fwd_bytes = per_row * (2 * d.n_heads + 2 * d.n_kv_heads)
    bwd_bytes = per_row * (4 * d.n_heads + 4 * d.n_kv_heads)
    return {
        "forward": (fwd_flops, fwd_bytes),
        "backward": (2.5 * fwd_flops, bwd_bytes),
        "fwd+bwd": (3.5 * fwd_flops, fwd_bytes + bwd_bytes),
    }[mode]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_self_attention(sattn_shape: SelfAttnShape, provider: str, mode: str, bench_env, measure,
                        check_gradients):
    device, dtype = bench_env.device.torch_device, bench_env.dtype
    reason = provider_unavailable(provider, device, dtype, mode)
    if reason:
        pytest.skip(f"{provider}: {reason}")
    inp = Inputs(sattn_shape, device, dtype)
    training = mode != "forward" or device.type == "cuda"
    fwd, leaves, to_packed = build_provider(provider, inp, training)
    if mode == "forward":
        # Checked in the grad mode it is timed in, so compiled Flex compiles once per shape.
        ref = varlen_attention(inp.q, inp.k, inp.v, inp.cu_t, inp.cu_t, inp.max_seqlen, inp.max_seqlen,
                               causal=True, backend="reference").detach()
        out = to_packed(fwd()).detach()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol, msg=lambda m: f"{provider}: {m}")

    dout = inp.dout_padded if provider in PADDED else inp.dout

    def make_fn():
        if mode == "forward":
            return fwd  # the check above already compiled (flex) and warmed it
        out = fwd()
        if mode == "backward":
            return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)
        return lambda: torch.autograd.grad(fwd(), leaves, dout)

    if mode != "forward":  # the timed callable's gradients, on the real rows
        got = [to_packed(grad) for grad in make_fn()()]
        check_gradients(f"{provider} {mode}", "qkv", got, inp.reference_gradients(dtype),
                        inp.reference_gradients(bench_env.exact_dtype))
        del got
    flops, nbytes = flops_bytes(sattn_shape, mode, torch.finfo(dtype).bits // 8)
    note = "forward under no_grad" if provider == "flex" and not training else ""
    measure(make_fn, suite=SUITE, provider=provider, mode=mode, shape=sattn_shape.key, flops=flops, bytes=nbytes,
            note=note)
