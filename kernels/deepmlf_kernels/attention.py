"""Variable-length FlashAttention-2 in Triton: forward, backward, dropout, GQA.

One kernel family for packed sequences (`cu_seqlens` layout) sized for short rows: the
LM self-attention at T ~ 70 and the fusion-token cross-attention (F = 8-20 queries
against L = 50-500 keys). Semantics are those of `deepmlf_fast.ops.attention`; this file
holds the kernels, their launchers and the `torch.library` registration.

Supports
* packed q `(Nq, Hq, d)`, k/v `(Nk, Hkv, d)` with any strides (Hugging Face's transposed
  views are read in place), `cu_seqlens_q/k` `(B+1,)` int32, optional `seqused_k` `(B,)`;
* causal masking aligned bottom-right (query i sees key j iff j <= i + Lk - Lq) or none;
* grouped/multi-query attention, Hq % Hkv == 0 (query head h reads kv head h // (Hq/Hkv));
* head dims 1..256 through `BLOCK_D = next_pow2(max(d, 32))` and masked loads
  (30 for the absorbed cross-attention, 48, 64, 80, 128 in the presets);
* fp32 / bf16 / fp16 inputs, fp32 softmax and accumulation. bf16/fp16 dots run on
  tensor cores (P and dS narrowed to the operand dtype first, as in FlashAttention);
  fp32 dots follow PyTorch's cuBLAS setting, read at every launch
  (`deepmlf_kernels.common.dot_precision`): TF32 when
  `torch.backends.cuda.matmul.fp32_precision == "tf32"` (or `allow_tf32`), otherwise
  3xTF32, fp32-accurate on tensor cores; past BLOCK_D 128 (TF32) or 64 (3xTF32), where
  the tensor-core operands spill, IEEE fp32 FMA (`kernel_precision`);
* dropout on the attention probabilities from in-kernel Philox: element (b, h, i, j) draws
  `tl.rand(seed, ((b*Hq + h)*max_seqlen_q + i)*max_seqlen_k + j)`, with the seed read from
  a 1-element int64 tensor (CUDA-graph friendly). Backward regenerates the same bits, and
  `attention_dropout_mask` materialises them for tests;
* rows with no visible key (empty sample, `seqused_k` = 0, causal offset < 0) output 0,
  store lse = +inf, and get zero gradients; nothing produces NaN;
* deterministic backward: a dK/dV kernel (one program per key block x kv head x sample,
  looping over the group's query heads and query blocks) and a dQ kernel, no atomics,
  so repeated runs are bitwise identical.

Limits
* every query/key row must belong to a sample (`cu_seqlens_q[-1] == Nq`, same for k):
  rows outside all spans are neither written nor given gradients;
* max_seqlen_q / max_seqlen_k must bound the real lengths (they size the grid);
* no attention bias, no sliding window, no softcap, no KV cache paging;
* tiles are tuned for short rows (16-64); long sequences work but are not where it shines.

Tiles: `ATTN_TABLE` lists, per kernel, dot class (bf16/fp16, TF32, 3xTF32) and BLOCK_D,
the (BLOCK_M, BLOCK_N, num_warps, num_stages) configs the launchers autotune over;
`python -m deepmlf_kernels.aot` proves every entry compiles for sm_90 without register
spills and within 227 KB of shared memory. Larger head dims and fp32 get smaller tiles
and 8 warps. `DEEPMLF_TRITON_CONFIG` pins or narrows the choice at launch time (see
`deepmlf_kernels.common`). Autotuning launches each candidate several times on the same
arguments; every kernel here is safe under that, since none reads a buffer it writes:
each output element is stored once from values computed in registers, never
accumulated in memory.

Differences from the Triton tutorial (06-fused-attention): ragged lengths and padding in
one launch, bottom-right causal, GQA, arbitrary head dims and strides, dropout, a
deterministic GQA-aware backward. From FlashAttention-2 CUDA: same API and semantics,
smaller tiles, no split-KV.

Under `TRITON_INTERPRET=1` (CPU tests) tensors keep the dtypes the GPU uses and the two
operations the interpreter gets wrong go through helpers (`deepmlf_kernels.common`):
`_dot` computes on fp32 copies of its operands (emulating TF32 / 3xTF32 rounding for fp32
ones) and `_round` narrows to bf16 with integer round-to-nearest-even, at every point
where the GPU path narrows (P before P.V, dS before dQ and dK, P_drop before dV, every
store of a bf16/fp16 result). A missing narrowing therefore fails there as it fails to
compile on the GPU. The interpreter cannot time configs, so an unpinned launch runs the
largest tile of its candidates; the tests pin every other one.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from deepmlf_kernels.common import (
    INTERPRET, MAX_REGISTERS, TunedKernel, _dot, _round, capability, dot_class, dot_precision, excluded,
    max_shared_memory,
)

LOG2E = tl.constexpr(1.4426950408889634)  # softmax runs in base 2: exp(x) = exp2(x * LOG2E)


@triton.jit
def _seq_bounds(CU_Q, CU_K, SEQUSED_K, b, HAS_SEQUSED: tl.constexpr):
    """(first query row, query count, first key row, used key count, key span) of sample b."""
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    k_span = tl.load(CU_K + b + 1) - k_start
    if HAS_SEQUSED:
        k_len = tl.load(SEQUSED_K + b)
    else:
        k_len = k_span
    return q_start.to(tl.int64), q_len, k_start.to(tl.int64), k_len, k_span


@triton.jit
def _dropout_keep(seed, b, h, n_heads, offs_m, offs_n, max_seqlen_q, max_seqlen_k, dropout_p):
    """Keep-mask of one (BLOCK_M, BLOCK_N) tile; the counter is the element's index in
    the (B, Hq, max_seqlen_q, max_seqlen_k) layout, so every kernel draws the same bit."""
    row = (b * n_heads + h).to(tl.int64) * max_seqlen_q + offs_m
    return tl.rand(seed, row[:, None] * max_seqlen_k + offs_n[None, :]) > dropout_p


@triton.jit
def _visible(offs_m, offs_n, k_len, causal_offset, CAUSAL: tl.constexpr):
    vis = offs_n[None, :] < k_len
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    return vis


@triton.jit(do_not_specialize=["max_seqlen_q", "max_seqlen_k"])
def _varlen_attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, SEQUSED_K, SEED,
    stride_qn, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_on, stride_oh,
    n_rows_q, n_heads, group, max_seqlen_q, max_seqlen_k, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_SEQUSED: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """O and LSE of one (query block, query head, sample). Writes only O and LSE and
    reads neither, so repeated launches (autotuning) give the same result."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len, _ = _seq_bounds(CU_Q, CU_K, SEQUSED_K, b, HAS_SEQUSED)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    h_kv = h // group
    causal_offset = k_len - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        Q + (q_start + offs_m)[:, None] * stride_qn + h * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    k_base = K + k_start * stride_kn + h_kv * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + k_start * stride_vn + h_kv * stride_vh + offs_d[None, :] * stride_vd
    if DROPOUT:
        seed = tl.load(SEED)

    qk_scale = sm_scale * LOG2E
    # A finite floor instead of -inf keeps exp2(m_old - m_new) at 1, not NaN, for rows
    # that have seen only masked keys so far.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, m0 + BLOCK_M + causal_offset)
    for n0 in range(0, hi, BLOCK_N):
        kn = n0 + offs_n
        kv_mask = (kn < k_len)[:, None] & mask_d[None, :]
        k = tl.load(k_base + kn[:, None] * stride_kn, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_base + kn[:, None] * stride_vn, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(_visible(offs_m, kn, k_len, causal_offset, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        correction = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * correction + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, b, h, n_heads, offs_m, kn, max_seqlen_q, max_seqlen_k, dropout_p)
            p = tl.where(keep, p, 0.0)
        # P is narrowed to V's dtype for the tensor-core product, as FlashAttention does.
        acc = acc * correction[:, None] + _dot(_round(p, v.dtype, UPCAST), v, DOT_PRECISION, UPCAST)
        m_i = m_new

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    tl.store(
        O + (q_start + offs_m)[:, None] * stride_on + h * stride_oh + offs_d[None, :],
        _round(out, O.dtype.element_ty, UPCAST), mask=mask_m[:, None] & mask_d[None, :],
    )
    # lse of the scaled scores in natural log; +inf on empty rows makes every recomputed
    # probability exp(s - lse) exactly 0 in the backward.
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) / LOG2E, float("inf"))
    tl.store(LSE + h * n_rows_q + q_start + offs_m, lse, mask=mask_m)


@triton.jit
def _varlen_attn_bwd_preprocess_kernel(
    O, DO, DELTA, n_rows,
    stride_on, stride_oh, stride_don, stride_doh, stride_dod,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) per (head, row): the softmax backward's correction term.
    With dropout it still equals rowsum(P * dP) because O already carries the mask.
    Writes only DELTA (not autotuned)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + rows * stride_on + h * stride_oh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(
        DO + rows * stride_don + h * stride_doh + offs_d[None, :] * stride_dod, mask=mask, other=0.0
    ).to(tl.float32)
    tl.store(DELTA + h * n_rows + offs_m, tl.sum(o * do, 1), mask=offs_m < n_rows)


@triton.jit(do_not_specialize=["max_seqlen_q", "max_seqlen_k"])
def _varlen_attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K, SEQUSED_K, SEED,
    stride_qn, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_don, stride_doh, stride_dod,
    stride_dqn, stride_dqh,
    n_rows_q, n_heads, group, max_seqlen_q, max_seqlen_k, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_SEQUSED: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one (query block, query head, sample), accumulated in registers over the
    key blocks. Writes only DQ and reads it nowhere: repeated launches are harmless."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len, _ = _seq_bounds(CU_Q, CU_K, SEQUSED_K, b, HAS_SEQUSED)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    h_kv = h // group
    causal_offset = k_len - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    qd_mask = mask_m[:, None] & mask_d[None, :]
    rows = (q_start + offs_m)[:, None]
    q = tl.load(Q + rows * stride_qn + h * stride_qh + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
    do = tl.load(DO + rows * stride_don + h * stride_doh + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
    lse2 = tl.load(LSE + h * n_rows_q + q_start + offs_m, mask=mask_m, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + h * n_rows_q + q_start + offs_m, mask=mask_m, other=0.0)
    k_base = K + k_start * stride_kn + h_kv * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + k_start * stride_vn + h_kv * stride_vh + offs_d[None, :] * stride_vd
    if DROPOUT:
        seed = tl.load(SEED)
        keep_scale = 1.0 / (1.0 - dropout_p)

    qk_scale = sm_scale * LOG2E
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, m0 + BLOCK_M + causal_offset)
    for n0 in range(0, hi, BLOCK_N):
        kn = n0 + offs_n
        kv_mask = (kn < k_len)[:, None] & mask_d[None, :]
        k = tl.load(k_base + kn[:, None] * stride_kn, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_base + kn[:, None] * stride_vn, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N)
        vis = _visible(offs_m, kn, k_len, causal_offset, CAUSAL)
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), DOT_PRECISION, UPCAST)
        if DROPOUT:
            keep = _dropout_keep(seed, b, h, n_heads, offs_m, kn, max_seqlen_q, max_seqlen_k, dropout_p)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(_round(ds, k.dtype, UPCAST), k, DOT_PRECISION, UPCAST)
    dq = dq * sm_scale
    tl.store(
        DQ + rows * stride_dqn + h * stride_dqh + offs_d[None, :], _round(dq, DQ.dtype.element_ty, UPCAST),
        mask=qd_mask,
    )


@triton.jit(do_not_specialize=["max_seqlen_q", "max_seqlen_k"])
def _varlen_attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K, SEQUSED_K, SEED,
    stride_qn, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_don, stride_doh, stride_dod,
    stride_dkn, stride_dkh,
    n_rows_q, n_heads, group, max_seqlen_q, max_seqlen_k, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_SEQUSED: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK and dV of one (key block, kv head, sample), accumulated in registers over the
    group's query heads and their query blocks, so no atomics and a fixed summation
    order. Writes only DK and DV and reads neither: repeated launches are harmless."""
    pid_n = tl.program_id(0)
    h_kv = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len, k_span = _seq_bounds(CU_Q, CU_K, SEQUSED_K, b, HAS_SEQUSED)
    n0 = pid_n * BLOCK_N
    if n0 >= k_span:
        return
    causal_offset = k_len - q_len

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    kv_mask = (offs_n < k_len)[:, None] & mask_d[None, :]
    k = tl.load(
        K + (k_start + offs_n)[:, None] * stride_kn + h_kv * stride_kh + offs_d[None, :] * stride_kd,
        mask=kv_mask, other=0.0,
    )  # (BLOCK_N, BLOCK_D)
    v = tl.load(
        V + (k_start + offs_n)[:, None] * stride_vn + h_kv * stride_vh + offs_d[None, :] * stride_vd,
        mask=kv_mask, other=0.0,
    )
    if DROPOUT:
        seed = tl.load(SEED)
        keep_scale = 1.0 / (1.0 - dropout_p)

    # Query rows that can see this key block: all of them, or under the causal mask
    # those with i >= n0 - causal_offset. Key blocks past the used keys see none (their
    # gradients are stored as zeros).
    lo = 0
    if CAUSAL:
        lo = tl.maximum(n0 - causal_offset, 0) // BLOCK_M * BLOCK_M
    hi = tl.where(n0 < k_len, q_len, 0)
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for g in range(0, group):
        h = h_kv * group + g
        q_base = Q + q_start * stride_qn + h * stride_qh + offs_d[None, :] * stride_qd
        do_base = DO + q_start * stride_don + h * stride_doh + offs_d[None, :] * stride_dod
        for m0 in range(lo, hi, BLOCK_M):
            qm = m0 + offs_m
            mask_m = qm < q_len
            qd_mask = mask_m[:, None] & mask_d[None, :]
            q = tl.load(q_base + qm[:, None] * stride_qn, mask=qd_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
            do = tl.load(do_base + qm[:, None] * stride_don, mask=qd_mask, other=0.0)
            lse2 = tl.load(LSE + h * n_rows_q + q_start + qm, mask=mask_m, other=float("inf")) * LOG2E
            delta = tl.load(DELTA + h * n_rows_q + q_start + qm, mask=mask_m, other=0.0)

            s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N)
            vis = _visible(qm, offs_n, k_len, causal_offset, CAUSAL) & mask_m[:, None]
            p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), DOT_PRECISION, UPCAST)
            if DROPOUT:
                keep = _dropout_keep(seed, b, h, n_heads, qm, offs_n, max_seqlen_q, max_seqlen_k, dropout_p)
                p_drop = tl.where(keep, p * keep_scale, 0.0)
                dp = tl.where(keep, dp * keep_scale, 0.0)
            else:
                p_drop = p
            dv += _dot(tl.trans(_round(p_drop, do.dtype, UPCAST)), do, DOT_PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(_round(ds, q.dtype, UPCAST)), q, DOT_PRECISION, UPCAST)
    dk = dk * sm_scale
    out_mask = (offs_n < k_span)[:, None] & mask_d[None, :]
    out_off = (k_start + offs_n)[:, None] * stride_dkn + h_kv * stride_dkh + offs_d[None, :]
    tl.store(DK + out_off, _round(dk, DK.dtype.element_ty, UPCAST), mask=out_mask)
    tl.store(DV + out_off, _round(dv, DV.dtype.element_ty, UPCAST), mask=out_mask)


@triton.jit(do_not_specialize=["max_seqlen_q", "max_seqlen_k"])
def _attn_dropout_mask_kernel(
    SEED, MASK, n_heads, max_seqlen_q, max_seqlen_k, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    seed = tl.load(SEED)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row = (b * n_heads + h).to(tl.int64) * max_seqlen_q + offs_m
    for n0 in range(0, max_seqlen_k, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, b, h, n_heads, offs_m, offs_n, max_seqlen_q, max_seqlen_k, dropout_p)
        mask = (offs_m < max_seqlen_q)[:, None] & (offs_n < max_seqlen_k)[None, :]
        tl.store(MASK + row[:, None] * max_seqlen_k + offs_n[None, :], keep.to(tl.int8), mask=mask)


# Configs per kernel, dot class and BLOCK_D: (BLOCK_M, BLOCK_N, num_warps, num_stages),
# four at most so autotuning stays short. Rows are short (8-500): tiles of 16-64 waste
# less on padding than FA2's 128x128, and a 16-row tile fits the 8-20 fusion queries.
# Chosen from sweeps of ptxas -v on sm_90: per tile, the warps / stages with the fewest
# registers, and no tile that spills or comes within ~15 registers of the 255 limit in
# any flag combination (`python -m deepmlf_kernels.aot` checks them). Wider heads and
# fp32 get 8 warps and smaller tiles; the dK/dV kernel, which holds K, V, dK and dV
# across its loop, is the tightest.
ATTN_TABLE = {
    "attn_fwd": {
        ("16bit", 32): ((16, 64, 4, 2), (32, 32, 4, 1), (64, 32, 4, 1), (64, 64, 8, 2)),
        ("16bit", 64): ((16, 64, 4, 2), (32, 64, 8, 2), (64, 32, 4, 1), (64, 64, 8, 2)),
        ("16bit", 128): ((16, 64, 8, 2), (32, 64, 8, 1), (64, 32, 8, 1), (64, 64, 8, 2)),
        ("16bit", 256): ((16, 32, 8, 2), (16, 64, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)),
        **{("tf32", bd): ((16, 32, 8, 1), (32, 32, 4, 1), (16, 64, 8, 1), (64, 32, 8, 1)) for bd in (32, 64)},
        ("tf32", 128): ((16, 32, 8, 1), (32, 32, 8, 1), (16, 64, 8, 1), (32, 64, 8, 1)),
        **{("tf32x3", bd): ((16, 32, 4, 1), (16, 64, 8, 1), (64, 32, 4, 1)) for bd in (32, 64)},
        ("ieee", 128): ((16, 32, 8, 1), (32, 64, 8, 1)),
        ("ieee", 256): ((16, 16, 8, 1), (16, 32, 8, 1), (16, 64, 8, 1)),
    },
    "attn_bwd_dq": {
        ("16bit", 32): ((16, 64, 4, 1), (32, 32, 4, 1), (64, 32, 8, 1), (64, 64, 8, 2)),
        ("16bit", 64): ((16, 64, 8, 1), (32, 64, 8, 1), (64, 32, 8, 1), (64, 64, 8, 2)),
        ("16bit", 128): ((16, 64, 8, 2), (32, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)),
        ("16bit", 256): ((16, 32, 8, 2), (16, 64, 8, 2), (32, 32, 8, 2), (32, 64, 8, 2)),
        **{("tf32", bd): ((16, 32, 8, 1), (32, 32, 8, 1), (16, 64, 8, 1), (64, 16, 8, 1)) for bd in (32, 64)},
        ("tf32", 128): ((16, 32, 8, 1), (32, 16, 8, 1), (32, 32, 8, 1), (16, 64, 8, 1)),
        **{("tf32x3", bd): ((16, 16, 4, 1), (16, 32, 4, 1), (16, 64, 8, 1)) for bd in (32, 64)},
        ("ieee", 128): ((16, 32, 8, 1), (32, 32, 8, 1), (16, 64, 8, 1)),
        # 16x16: the only tile within 99 KB (sm_86, sm_89, sm_120) at fp32 head dim 256.
        ("ieee", 256): ((16, 32, 8, 1), (16, 16, 8, 1)),
    },
    "attn_bwd_dkdv": {
        ("16bit", 32): ((16, 64, 8, 1), (32, 32, 8, 1), (32, 64, 8, 2), (64, 32, 8, 1)),
        ("16bit", 64): ((16, 64, 8, 1), (32, 32, 4, 1), (32, 64, 8, 2), (64, 32, 8, 1)),
        ("16bit", 128): ((16, 64, 8, 2), (32, 16, 8, 2), (32, 32, 4, 1), (32, 64, 8, 2)),
        ("16bit", 256): ((16, 16, 8, 2), (16, 32, 8, 1), (32, 16, 8, 2), (32, 32, 8, 1)),
        **{("tf32", bd): ((16, 32, 4, 1), (32, 16, 4, 1), (32, 32, 8, 1), (16, 64, 8, 1)) for bd in (32, 64)},
        ("tf32", 128): ((16, 32, 8, 1), (32, 16, 8, 1), (32, 32, 8, 1), (16, 64, 8, 1)),
        **{("tf32x3", bd): ((16, 16, 8, 1), (16, 64, 8, 1)) for bd in (32, 64)},
        ("ieee", 128): ((16, 16, 4, 1), (32, 16, 8, 1)),
        ("ieee", 256): ((16, 16, 8, 1),),
    },
}
# fp32 dots take the tensor-core precision PyTorch's setting asks for up to this BLOCK_D
# and IEEE FMA beyond: tensor-core operand fragments are replicated across the warps of
# a narrow tile and 3xTF32 holds two of each, so wider heads spill in the backward.
# IEEE is as accurate as 3xTF32 and at least as accurate as TF32.
FP32_TENSOR_CORE_MAX_BLOCK_D = {"tf32": 128, "tf32x3": 64}


def kernel_precision(precision: str | None, block_d: int) -> str | None:
    """The attention kernels' DOT_PRECISION for the requested one (`dot_precision`) at
    `block_d`: unchanged for bf16/fp16 (None) and narrow heads, "ieee" for wider fp32 heads."""
    if precision in FP32_TENSOR_CORE_MAX_BLOCK_D and block_d > FP32_TENSOR_CORE_MAX_BLOCK_D[precision]:
        return "ieee"
    return precision


def attention_configs(kernel: str, cls: str, block_d: int) -> list[triton.Config]:
    """The configs `kernel` ("attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv") may run with for
    dot class `cls` ("16bit", "tf32", "tf32x3", "ieee") and padded head dim `block_d`."""
    return [_config(*tile) for tile in ATTN_TABLE[kernel][(cls, block_d)]]


def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages,
                         maxnreg=MAX_REGISTERS)


def _space(kernel):
    def space(args):
        device = args["Q"].device
        return list(_viable(kernel, dot_class(args["DOT_PRECISION"]), args["BLOCK_D"], max_shared_memory(device),
                            capability(device)))

    return space


@functools.lru_cache(maxsize=None)  # per launch otherwise: the same Config objects every time
def _viable(kernel: str, cls: str, block_d: int, limit: int, arch: int) -> tuple[triton.Config, ...]:
    """The table's configs for (kernel, cls, block_d) whose shared memory fits in `limit` bytes
    and that the AOT check did not exclude on compute capability `arch`."""
    return tuple(c for c in attention_configs(kernel, cls, block_d)
                 if shared_memory_estimate(kernel, c, block_d, cls) <= limit
                 and not excluded(kernel, cls, block_d, c, arch))


def shared_memory_estimate(kernel: str, config: triton.Config, block_d: int, cls: str) -> int:
    """Upper estimate of the shared memory (bytes) `kernel` needs with `config` for dot
    class `cls` (`dot_class`): the tiles the loop streams (K and V blocks in the forward
    and dQ, Q and dO blocks in dK/dV) once per pipeline stage, the tiles held across the
    loop (twice under 3xTF32, which splits them into two parts), and an fp32
    (BLOCK_M, BLOCK_N) tile for layout changes. `python -m deepmlf_kernels.aot` checks
    that it bounds what Triton allocates for sm_90 and admits every table entry there."""
    m, n, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    # dQ and dK/dV also hold a streamed block in a second operand layout.
    streamed, held = {"attn_fwd": (2 * n, m), "attn_bwd_dq": (2 * n, 2 * m + n),
                      "attn_bwd_dkdv": (2 * m, 2 * n + 2 * m)}[kernel]
    if cls == "tf32x3":
        held *= 2
    return (2 if cls == "16bit" else 4) * block_d * (streamed * stages + held) + 4 * m * n


def _tuned(name, fn):
    tiles = dict.fromkeys(tile for table in ATTN_TABLE[name].values() for tile in table)  # ordered union
    return TunedKernel(name, fn, [_config(*tile) for tile in tiles], _ATTN_KEY, _space(name))


# Tuned once per (dtype, head dim, flags, dot precision); lengths are left out of the key
# on purpose, since they change every batch and each retune costs about a second.
_ATTN_KEY = ["HEAD_DIM", "CAUSAL", "DROPOUT", "DOT_PRECISION"]
_fwd_kernel = _tuned("attn_fwd", _varlen_attn_fwd_kernel)
_bwd_dq_kernel = _tuned("attn_bwd_dq", _varlen_attn_bwd_dq_kernel)
_bwd_dkdv_kernel = _tuned("attn_bwd_dkdv", _varlen_attn_bwd_dkdv_kernel)
PREPROCESS_BLOCK_M = 64
MASK_BLOCK, MASK_WARPS = 64, 8  # 64x64 Philox draws spill on 4 warps


def block_d(head_dim: int) -> int:
    """Padded head dim the kernels tile with: the next power of two, at least 32 (tl.dot
    needs 16; a 16-wide head padded to 32 costs little and shares the 32 configs, one
    specialisation fewer to tune and check)."""
    return max(32, triton.next_power_of_2(head_dim))


def _flags(q, seqused_k, dropout_p, causal):
    d = q.shape[-1]
    return dict(
        HEAD_DIM=d, BLOCK_D=block_d(d), CAUSAL=causal, HAS_SEQUSED=seqused_k is not None,
        DROPOUT=dropout_p > 0.0, DOT_PRECISION=kernel_precision(dot_precision(q.dtype), block_d(d)),
        UPCAST=INTERPRET,
    )


def _optional_pointers(seqused_k, seed, placeholder):
    """SEQUSED_K and SEED arguments; a kernel never reads them when HAS_SEQUSED / DROPOUT
    is off, so any tensor stands in."""
    return (placeholder if seqused_k is None else seqused_k), (placeholder if seed is None else seed)


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, seed,
                             max_seqlen_q, max_seqlen_k, causal, scale, dropout_p):
    """Launch the forward kernel. Returns `out (Nq, Hq, d)` in q's dtype and
    `lse (Hq, Nq)` fp32 (natural-log logsumexp of the scaled scores, +inf on empty rows)."""
    n_q, hq, d = q.shape
    hkv = k.shape[1]
    bsz = cu_seqlens_q.numel() - 1
    out = torch.empty((n_q, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, n_q), dtype=torch.float32, device=q.device)
    if min(n_q, bsz, max_seqlen_q, k.shape[0], max_seqlen_k) == 0:  # nothing to attend to
        return out.zero_(), lse.fill_(float("inf"))
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), hq, bsz)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *_optional_pointers(seqused_k, seed, cu_seqlens_k),
        *q.stride(), *k.stride(), *v.stride(), out.stride(0), out.stride(1),
        n_q, hq, hq // hkv, max_seqlen_q, max_seqlen_k, scale, dropout_p,
        **_flags(q, seqused_k, dropout_p, causal),
    )
    return out, lse


def varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, seed,
                              max_seqlen_q, max_seqlen_k, causal, scale, dropout_p):
    """Launch preprocess, dK/dV and dQ kernels. Returns `(dq, dk, dv)` shaped like q, k, v."""
    n_q, hq, d = q.shape
    n_k, hkv, _ = k.shape
    bsz = cu_seqlens_q.numel() - 1
    dq = torch.empty((n_q, hq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((n_k, hkv, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((n_k, hkv, d), dtype=v.dtype, device=v.device)
    if min(n_q, bsz, max_seqlen_q, n_k, max_seqlen_k) == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((hq, n_q), dtype=torch.float32, device=q.device)
    _varlen_attn_bwd_preprocess_kernel[(triton.cdiv(n_q, PREPROCESS_BLOCK_M), hq)](
        out, dout, delta, n_q, out.stride(0), out.stride(1), *dout.stride(),
        HEAD_DIM=d, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_D=block_d(d),
    )
    optional = _optional_pointers(seqused_k, seed, cu_seqlens_k)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    scalars = (n_q, hq, hq // hkv, max_seqlen_q, max_seqlen_k, scale, dropout_p)
    flags = _flags(q, seqused_k, dropout_p, causal)
    grid_kv = lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), hkv, bsz)  # noqa: E731
    _bwd_dkdv_kernel[grid_kv](
        q, k, v, dout, dk, dv, lse, delta, cu_seqlens_q, cu_seqlens_k, *optional,
        *strides, dk.stride(0), dk.stride(1), *scalars, **flags,
    )
    grid_q = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), hq, bsz)  # noqa: E731
    _bwd_dq_kernel[grid_q](
        q, k, v, dout, dq, lse, delta, cu_seqlens_q, cu_seqlens_k, *optional,
        *strides, dq.stride(0), dq.stride(1), *scalars, **flags,
    )
    return dq, dk, dv


def attention_dropout_mask(seed: torch.Tensor, batch: int, n_heads: int, max_seqlen_q: int,
                           max_seqlen_k: int, dropout_p: float) -> torch.Tensor:
    """The keep-mask the attention kernels draw for `seed`, as `(B, Hq, max_seqlen_q,
    max_seqlen_k)` bool; pass it to `varlen_attention_reference(dropout_mask=...)`."""
    mask = torch.empty((batch, n_heads, max_seqlen_q, max_seqlen_k), dtype=torch.int8, device=seed.device)
    if mask.numel() > 0:
        _attn_dropout_mask_kernel[(triton.cdiv(max_seqlen_q, MASK_BLOCK), n_heads, batch)](
            seed, mask, n_heads, max_seqlen_q, max_seqlen_k, dropout_p, BLOCK_M=MASK_BLOCK, BLOCK_N=MASK_BLOCK,
            num_warps=MASK_WARPS,
        )
    return mask.view(torch.bool)


def new_seed(device, n: int = 1) -> torch.Tensor:
    """`(n,)` int64 Philox seeds drawn from torch's generator on `device`, so
    `torch.manual_seed` reproduces kernel dropout and CUDA graphs capture the draw."""
    return torch.randint(0, 2**62, (n,), dtype=torch.int64, device=device)


# torch.library registration: opaque custom ops, so torch.compile(fullgraph=True) treats
# each launch as one node (triton_op would let inductor look inside, which fails on CPU
# under the interpreter), with register_autograd in place of an autograd.Function.

@torch.library.custom_op("deepmlf::varlen_attention_fwd", mutates_args=())
def _varlen_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    seqused_k: torch.Tensor | None, seed: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, seed,
                                    max_seqlen_q, max_seqlen_k, causal, scale, dropout_p)


@_varlen_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, seed, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p):
    n_q, hq, d = q.shape
    return q.new_empty((n_q, hq, d)), q.new_empty((hq, n_q), dtype=torch.float32)


@torch.library.custom_op("deepmlf::varlen_attention_bwd", mutates_args=())
def _varlen_attention_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    seqused_k: torch.Tensor | None, seed: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, seed,
                                     max_seqlen_q, max_seqlen_k, causal, scale, dropout_p)


@_varlen_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, seed,
      max_seqlen_q, max_seqlen_k, causal, scale, dropout_p):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, seqused_k, seed = inputs[:7]
    ctx.static = inputs[7:]  # max_seqlen_q, max_seqlen_k, causal, scale, dropout_p
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seqused_k, seed)


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, seqused_k, seed = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_bwd_op(dout, q, k, v, out, lse, cu_q, cu_k, seqused_k, seed, *ctx.static)
    return dq, dk, dv, *[None] * 9


_varlen_attention_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def varlen_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seqused_k: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton `varlen_attention` (see `deepmlf_fast.ops.attention` for the semantics).

    Args: as `varlen_attention`, plus `seed`, an optional `(1,)` int64 tensor on q's device
    that fixes the dropout bits (drawn from torch's generator when None); replay them with
    `attention_dropout_mask(seed, B, Hq, max_seqlen_q, max_seqlen_k, dropout_p)`.

    Returns:
        `(Nq, Hq, d)` in q's dtype, differentiable w.r.t. q, k and v.
    """
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"varlen_attention_triton: q, k, v must share one of fp32/bf16/fp16, found "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"varlen_attention_triton: head dim {q.shape[-1]} > 256 is not supported")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if dropout_p > 0.0:
        seed = new_seed(q.device) if seed is None else seed
    else:
        seed = None
    cu_q = cu_seqlens_q.to(torch.int32)
    cu_k = cu_seqlens_k.to(torch.int32)
    used = None if seqused_k is None else seqused_k.to(torch.int32)
    out, _ = _varlen_attention_fwd_op(q, k, v, cu_q, cu_k, used, seed, int(max_seqlen_q), int(max_seqlen_k),
                                      bool(causal), scale, dropout_p)
    return out
