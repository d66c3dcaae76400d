"""Triton varlen attention against the PyTorch reference (FlashAttention-style tests).

Each case runs forward and backward three times: the kernel, the reference in the same
dtype and the reference in float64, and checks the output and dq, dk, dv with the error
ratio criterion (`assert_fa_close` in conftest). On CPU the kernels are interpreted, so
shapes stay small and blocks large.
"""

from __future__ import annotations

import pytest
import torch

from deepmlf_fast.ops.attention import padded_attention, varlen_attention_reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
FP32, BF16 = torch.float32, torch.bfloat16


def _cu(lens, device):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _inputs(lens_q, lens_k, hq, hkv, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g)
    k = torch.randn(sum(lens_k), hkv, d, generator=g)
    v = torch.randn(sum(lens_k), hkv, d, generator=g)
    dout = torch.randn(sum(lens_q), hq, d, generator=g)
    return [t.to(device, dtype) for t in (q, k, v, dout)]


def _last_key_dominant(lens_q, lens_k, hq, hkv, d, dtype, device):
    """`_inputs` where each sample's last query row puts ~98 % of its softmax weight on the
    sample's last key (score ~8 against ~N(0, 1) for the others), in every query head.
    Under the bottom-right causal mask that key is visible to that row only, so a key loop
    that stops one key short changes the row by O(1), far above bf16's rounding."""
    q, k, v, dout = (t.float().cpu() for t in _inputs(lens_q, lens_k, hq, hkv, d, FP32, "cpu"))
    cu_q, cu_k = _cu(lens_q, "cpu").tolist(), _cu(lens_k, "cpu").tolist()
    for b in range(len(lens_q)):
        if lens_q[b] and lens_k[b]:
            key = k[cu_k[b + 1] - 1].repeat_interleave(hq // hkv, dim=0)  # (hq, d), kv head of each query head
            q[cu_q[b + 1] - 1] = key * (8.0 * d**0.5 / key.square().sum(-1, keepdim=True))
    return [t.to(device, dtype) for t in (q, k, v, dout)]


def _fwd_bwd(fn, q, k, v, dout, *args, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, *args, **kwargs)
    return [out, *torch.autograd.grad(out, (q, k, v), dout)]


def _check(assert_fa_close, lens_q, lens_k, hq, hkv, d, dtype, device, *, seqused=None, dropout_p=0.0,
           baseline=None, make_inputs=_inputs, **kw):
    """Kernel vs the reference in `baseline` (default: the input dtype; bf16 for fp32 under
    TF32, whose 10-bit operands make fp32's bound unfair) vs the reference in fp64, on
    `make_inputs(lens_q, lens_k, hq, hkv, d, dtype, device)` (q, k, v, dout)."""
    from deepmlf_kernels.attention import attention_dropout_mask, varlen_attention_triton

    q, k, v, dout = make_inputs(lens_q, lens_k, hq, hkv, d, dtype, device)
    args = (_cu(lens_q, device), _cu(lens_k, device), max(lens_q), max(lens_k))
    used = None if seqused is None else torch.tensor(seqused, dtype=torch.int32, device=device)
    seed = torch.tensor([2024], dtype=torch.int64, device=device)
    kernel = _fwd_bwd(varlen_attention_triton, q, k, v, dout, *args, seqused_k=used, dropout_p=dropout_p,
                      seed=seed, **kw)
    ref_kw = dict(kw, seqused_k=used, dropout_p=dropout_p)
    if dropout_p > 0:
        ref_kw["dropout_mask"] = attention_dropout_mask(seed, len(lens_q), hq, args[2], args[3], dropout_p)
    low = [t.to(baseline or dtype) for t in (q, k, v, dout)]
    lowprec = _fwd_bwd(varlen_attention_reference, *low[:3], low[3], *args, **ref_kw)
    exact = _fwd_bwd(varlen_attention_reference, q.double(), k.double(), v.double(), dout.double(), *args, **ref_kw)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), kernel, lowprec, exact):
        assert_fa_close(name, a, b, c)
    return kernel


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("causal", [True, False])
def test_odd_lengths(device, assert_fa_close, causal, dtype):
    lens = [1, 7, 63, 65, 129]
    _check(assert_fa_close, lens, lens, 2, 2, 64, dtype, device, causal=causal)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_query_tile_ending_one_key_past_a_key_tile(device, assert_fa_close, dtype):
    """Causal, Lk > Lq, and a full query tile whose causal key bound (m0 + BLOCK_M + Lk - Lq)
    is one more than a multiple of BLOCK_N: the key loop must reach that last key. 70 queries
    over 71 keys (64-row tiles: bound 65), 64 over 129 (bound 129), and the fusion rows' pass
    over the text prefix (20 fusion tokens of SIMS over 17 text + 20 fusion keys: bound 33
    with 16-row tiles). Unpinned, the interpreter runs the largest tile (64x64);
    `test_kernel_configs` pins every tile of the tables on shapes built from it."""
    _check(assert_fa_close, [70, 64, 20], [71, 129, 37], 2, 1, 30, dtype, device, causal=True,
           make_inputs=_last_key_dominant)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_gqa_smollm2_heads(device, assert_fa_close, dtype):
    """SmolLM2-135M: 9 query heads over 3 kv heads of width 64, T ~ 70, batch 1 and 2."""
    _check(assert_fa_close, [70], [70], 9, 3, 64, dtype, device, causal=True)
    _check(assert_fa_close, [70, 33], [70, 33], 9, 3, 64, dtype, device, causal=True)


@pytest.mark.parametrize(
    "d, dtype",
    [(16, FP32), (16, BF16), (30, FP32), (30, BF16), (48, FP32), (64, FP32), (64, BF16), (64, torch.float16),
     (80, FP32), (80, BF16), (128, FP32), (128, BF16), (256, FP32), (256, BF16), (256, torch.float16)],
)
def test_head_dims(device, assert_fa_close, d, dtype):
    """Every BLOCK_D (16 to 256), padded (30, 48, 80) and exact, in each dtype."""
    _check(assert_fa_close, [7, 20], [7, 20], 2, 1, d, dtype, device, causal=True)


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("causal", [True, False])
def test_cross_lengths_and_empty_rows(device, assert_fa_close, causal, dtype):
    """Lq != Lk both ways, seqused_k < span, a sample with no used key and one with no query:
    rows that see no key are zero with zero gradients (causal rows i < Lq - Lk too)."""
    lens_q, lens_k, used = [5, 20, 3, 0, 4], [9, 3, 7, 2, 6], [9, 3, 0, 2, 2]
    out, dq, dk, dv = _check(assert_fa_close, lens_q, lens_k, 4, 2, 32, dtype, device,
                             seqused=used, causal=causal)
    q_rows = _cu(lens_q, "cpu").tolist()
    k_rows = _cu(lens_k, "cpu").tolist()
    empty = slice(q_rows[2], q_rows[3])  # sample 2 uses no key
    assert out[empty].abs().max() == 0 and dq[empty].abs().max() == 0
    unused = slice(k_rows[4] + used[4], k_rows[5])  # keys past seqused_k
    assert dk[unused].abs().max() == 0 and dv[unused].abs().max() == 0
    if causal:  # sample 1: 20 queries over 3 keys, the first 17 rows see nothing
        blind = slice(q_rows[1], q_rows[1] + 17)
        assert out[blind].abs().max() == 0 and dq[blind].abs().max() == 0


def test_strided_views_read_in_place(device):
    """Non-contiguous q/k/v (a fused qkv buffer, a transposed k) give the same result as
    contiguous copies."""
    from deepmlf_kernels.attention import varlen_attention_triton

    lens = [7, 20]
    cu = _cu(lens, device)
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(27, 3, 2, 32, generator=g).to(device)  # (N, 3, H, d)
    k_t = torch.randn(27, 32, 2, generator=g).to(device).transpose(1, 2)  # (N, H, d), last stride H
    dout = torch.randn(27, 2, 32, generator=g).to(device)
    strided = _fwd_bwd(varlen_attention_triton, qkv[:, 0], k_t, qkv[:, 2], dout, cu, cu, 20, 20)
    contig = _fwd_bwd(varlen_attention_triton, qkv[:, 0].contiguous(), k_t.contiguous(), qkv[:, 2].contiguous(),
                      dout, cu, cu, 20, 20)
    for a, b in zip(strided, contig):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype, causal", [(FP32, True), (BF16, False)])
def test_dropout_replays_through_reference(device, assert_fa_close, dtype, causal):
    _check(assert_fa_close, [7, 63, 20], [7, 63, 33], 4, 2, 32, dtype, device,
           seqused=[7, 50, 33], causal=causal, dropout_p=0.2)


def test_dropout_keep_rate_and_seeding(device):
    from deepmlf_kernels.attention import attention_dropout_mask

    p = 0.3
    seed = torch.tensor([7], dtype=torch.int64, device=device)
    mask = attention_dropout_mask(seed, 2, 4, 64, 64, p)
    assert mask.shape == (2, 4, 64, 64) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01  # 32k draws: 4 standard deviations
    assert torch.equal(mask, attention_dropout_mask(seed, 2, 4, 64, 64, p))
    assert not torch.equal(mask, attention_dropout_mask(seed + 1, 2, 4, 64, 64, p))


def test_dropout_seed_follows_torch_generator(device):
    from deepmlf_kernels.attention import varlen_attention_triton

    q, k, v, _ = _inputs([9], [9], 2, 2, 16, FP32, device)
    cu = _cu([9], device)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(varlen_attention_triton(q, k, v, cu, cu, 9, 9, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], varlen_attention_triton(q, k, v, cu, cu, 9, 9, dropout_p=0.5))


def test_repeated_runs_bitwise_identical(device):
    from deepmlf_kernels.attention import varlen_attention_triton

    lens = [65, 7, 30]
    q, k, v, dout = _inputs(lens, lens, 4, 2, 32, BF16, device)
    cu = _cu(lens, device)
    seed = torch.tensor([5], dtype=torch.int64, device=device)
    runs = [_fwd_bwd(varlen_attention_triton, q, k, v, dout, cu, cu, 65, 65, dropout_p=0.1, seed=seed)
            for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_padded_attention_through_triton(device):
    """The Hugging Face layout (padding on either side) unpads into the same kernel."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 2, 12, 16, generator=g).to(device) for _ in range(3))
    mask = torch.ones(3, 12, dtype=torch.bool, device=device)
    mask[0, :4] = False  # left padding
    mask[1, 9:] = False  # right padding
    out = padded_attention(q, k, v, mask, backend="triton")
    ref = padded_attention(q, k, v, mask, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_rejects_unsupported_dtype(device):
    from deepmlf_kernels.attention import varlen_attention_triton

    q = torch.randn(4, 1, 16, dtype=torch.float64, device=device)
    cu = _cu([4], device)
    with pytest.raises(TypeError, match="fp32/bf16/fp16"):
        varlen_attention_triton(q, q, q, cu, cu, 4, 4)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_gradcheck(causal):
    """The oracle itself: fp64 gradcheck with GQA, seqused_k and a sample with no key."""
    lens_q, lens_k = [3, 2, 1], [4, 2, 3]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(9, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(9, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    used = torch.tensor([4, 0, 2], dtype=torch.int32)
    keep = torch.rand(3, 2, 3, 4, generator=g) > 0.3

    def fn(q, k, v):
        return varlen_attention_reference(q, k, v, _cu(lens_q, "cpu"), _cu(lens_k, "cpu"), 3, 4, causal=causal,
                                          seqused_k=used, dropout_p=0.3, dropout_mask=keep)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_reference_plan_cache_is_exact_and_reused():
    """A pass shares one plan cache over its blocks: each call gives bitwise what an uncached
    call gives (forward and gradients), whatever the masking and GQA grouping the calls ask
    for, and the cache holds one plan per such variant, reused on the next round."""
    lens_q, lens_k = [3, 1, 4], [5, 2, 4]
    cu_q, cu_k = _cu(lens_q, "cpu"), _cu(lens_k, "cpu")
    cache: dict = {}
    for _ in range(2):
        for causal in (True, False):
            for hkv in (4, 2):
                q, k, v, dout = _inputs(lens_q, lens_k, 4, hkv, 8, FP32, "cpu", seed=hkv)
                want = _fwd_bwd(varlen_attention_reference, q, k, v, dout, cu_q, cu_k, 4, 5, causal=causal)
                got = _fwd_bwd(varlen_attention_reference, q, k, v, dout, cu_q, cu_k, 4, 5, causal=causal,
                               plan_cache=cache)
                for a, b in zip(got, want):
                    assert torch.equal(a, b)
        assert len(cache) == 4
