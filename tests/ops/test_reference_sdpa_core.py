"""The reference ops' SDPA core (what they run off the CPU, and what `auto` falls back to where
`deepmlf bench` measured SDPA faster than the kernels) computes the same function as their
explicit-softmax core: forced on here on CPU, in float64, outputs and every gradient, with
grouped-query heads, ragged lengths and samples that see no key at all."""

from __future__ import annotations

import pytest
import torch

import deepmlf_fast.ops.attention as attention
import deepmlf_fast.ops.cross_attention as cross_attention

F64 = torch.float64


def _run(fn, leaves, dout):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), grads


def _both(monkeypatch, fn, leaves, dout):
    explicit = _run(fn, leaves, dout)
    monkeypatch.setattr(attention, "sdpa_core", lambda t: True)
    monkeypatch.setattr(cross_attention, "sdpa_core", lambda t: True)
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    fused = _run(fn, leaves, dout)
    monkeypatch.undo()
    assert calls, "the SDPA core did not run"
    return explicit, fused


def _close(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-12)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_reference(monkeypatch, causal):
    g = torch.Generator().manual_seed(0)
    lens_q, lens_k, used = (3, 7, 1), (5, 7, 4), (0, 7, 2)  # sample 0 sees no key
    cu_q = torch.tensor([0, 3, 10, 11], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    q = torch.randn(sum(lens_q), 6, 16, generator=g, dtype=F64)
    k, v = (torch.randn(sum(lens_k), 2, 16, generator=g, dtype=F64) for _ in range(2))
    dout = torch.randn_like(q)
    seqused = torch.tensor(used, dtype=torch.int32)

    def fn(q, k, v):
        return attention.varlen_attention_reference(q, k, v, cu_q, cu_k, 7, 7, causal=causal, seqused_k=seqused)

    explicit, fused = _both(monkeypatch, fn, (q, k, v), dout)
    assert explicit[0][:3].abs().max() == 0  # the sample without keys outputs zeros on both paths
    _close(explicit, fused)


@pytest.mark.parametrize("form", ["plain", "absorbed"])
def test_cross_attention_reference(monkeypatch, form):
    g = torch.Generator().manual_seed(1)
    bsz, n_q, dim, n_kv, dkv, heads = 3, 4, 32, 9, 6, 4
    leaves = (torch.randn(bsz, n_q, dim, generator=g, dtype=F64), torch.randn(bsz, n_kv, dkv, generator=g, dtype=F64),
              1 + 0.1 * torch.randn(dim, generator=g, dtype=F64), 0.1 * torch.randn(dim, generator=g, dtype=F64),
              torch.randn(dim, dim, generator=g, dtype=F64) / dim**0.5,
              torch.randn(2 * dim, dkv, generator=g, dtype=F64) / dkv**0.5,
              torch.randn(dim, dim, generator=g, dtype=F64) / dim**0.5, torch.tensor([0.3], dtype=F64))
    av_lengths = torch.tensor([9, 0, 4])  # the second sample has no AV: x passes through

    def fn(*t):
        return cross_attention.gated_cross_attention_reference(*t, n_heads=heads, av_lengths=av_lengths, form=form)

    explicit, fused = _both(monkeypatch, fn, leaves, torch.randn(bsz, n_q, dim, generator=g, dtype=F64))
    torch.testing.assert_close(explicit[0][1], leaves[0][1])
    _close(explicit, fused)
