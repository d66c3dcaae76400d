"""Causal (or full) attention over packed variable-length sequences.

Public op: `varlen_attention` (packed, `cu_seqlens` layout, FlashAttention's API) and
`padded_attention` (the `[B, H, L, d]` + key-padding-mask layout Hugging Face passes),
which unpads and routes to the same op.

`varlen_attention_reference` is the plain PyTorch reference with the same signature:
the CPU path and the test oracle. The Triton path lives in
`deepmlf_kernels.attention` and is chosen on CUDA (see `resolve_backend`).

Semantics shared by every backend:
* sample b owns query rows `cu_seqlens_q[b]:cu_seqlens_q[b+1]` and key rows
  `cu_seqlens_k[b]:cu_seqlens_k[b] + used_k[b]`, where `used_k = seqused_k` if given,
  else the length from `cu_seqlens_k`;
* causal masking is bottom-right aligned: query i of a sample with Lq queries and Lk
  keys sees key j iff j <= i + (Lk - Lq) (FlashAttention >= 2.1 convention), so a
  query block that continues a key prefix sees the prefix;
* grouped-query attention: query head h reads key/value head h // (Hq // Hkv);
* a query row that sees no key outputs zeros and receives zero gradients (never NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepmlf_fast.ops.dispatch import resolve_backend
from deepmlf_fast.ops.dropout import dropout

MATH_PATH_MAX_KEYS = 256


def sdpa_core(t: torch.Tensor) -> bool:
    """True where the reference ops (`varlen_attention_reference`, the cross-attention's) run
    their attention core through `F.scaled_dot_product_attention` whatever the length: off the
    CPU, where SDPA's fused kernels beat explicit scores and the reference is what `auto` falls
    back to where the Triton kernels lose (`deepmlf bench`). On CPU the explicit softmax is
    several times faster at the recipes' lengths, and keeps CPU results as they were."""
    return t.device.type != "cpu"


def varlen_attention(
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
    backend: str = "auto",
    plan_cache: dict | None = None,
) -> torch.Tensor:
    """Attention over packed sequences.

    Args:
        q: `(Nq, Hq, d)` queries of all samples, concatenated.
        k, v: `(Nk, Hkv, d)` keys / values, Hq % Hkv == 0.
        cu_seqlens_q, cu_seqlens_k: `(B+1,)` int32 start offsets (last entry = total rows).
        max_seqlen_q, max_seqlen_k: Python ints bounding the per-sample lengths.
        causal: bottom-right aligned causal mask when True.
        scale: softmax scale, default `1/sqrt(d)`.
        dropout_p: dropout on attention probabilities (pass 0.0 at evaluation).
        seqused_k: optional `(B,)` int32 number of valid keys per sample (<= its span).
        backend: "auto" (Triton on CUDA, reference elsewhere), "triton" or "reference".
        plan_cache: a dict owned by this layout (these `cu_seqlens`), where the reference path
            keeps its `PaddingPlan` between calls (not with `seqused_k`): a pass through a
            decoder calls attention once per block on the same layout.

    Returns:
        `(Nq, Hq, d)` attention output in q's dtype.
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k)
    if resolve_backend(backend, q, ("attention",), "self_attention") == "triton":
        from deepmlf_kernels.attention import varlen_attention_triton

        if torch.is_autocast_enabled(q.device.type):
            # Custom ops are not autocast; under autocast, rotary embeddings in fp32 leave q/k
            # fp32 while v comes out of a linear in the autocast dtype: run all three in the latter.
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return varlen_attention_triton(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            causal=causal, scale=scale, dropout_p=dropout_p, seqused_k=seqused_k,
        )
    return varlen_attention_reference(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal=causal, scale=scale, dropout_p=dropout_p, seqused_k=seqused_k, plan_cache=plan_cache,
    )


@dataclass(frozen=True)
class PaddingPlan:
    """What `varlen_attention_reference` needs of a layout alone: where each packed row sits in
    the padded `(B, L)` layout and which keys each query row may see."""

    b_q: torch.Tensor
    """(Nq,) sample of each query row; `pos_q (Nq,)` its position, likewise `b_k`, `pos_k (Nk,)`."""
    pos_q: torch.Tensor
    b_k: torch.Tensor
    pos_k: torch.Tensor
    blocked: torch.Tensor
    """(B, 1, G*Lq, Lk) bool, True where a query may not see a key (G query heads per K/V head
    stacked as row blocks); a row with no visible key is let see key 0 (`has_key` zeroes it)."""
    has_key: torch.Tensor
    """(B, Lq) bool: the query row sees at least one key."""


def padding_plan(
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    n_q: int,
    n_k: int,
    *,
    causal: bool,
    group: int,
    seqused_k: torch.Tensor | None = None,
) -> PaddingPlan:
    """The `PaddingPlan` of a layout (arguments as `varlen_attention`'s; `n_q`, `n_k` packed rows,
    `group` query heads per K/V head)."""
    lens_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    span_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    lens_k = span_k if seqused_k is None else seqused_k.long()
    bsz = lens_q.numel()
    b_q, pos_q = _rows_to_padded(cu_seqlens_q, lens_q, n_q)
    b_k, pos_k = _rows_to_padded(cu_seqlens_k, span_k, n_k)
    i = torch.arange(max_seqlen_q, device=lens_q.device)
    j = torch.arange(max_seqlen_k, device=lens_q.device)
    visible = j[None, None, :] < lens_k[:, None, None]  # (B, 1, Lk)
    if causal:
        offset = (lens_k - lens_q)[:, None, None]
        visible = visible & (j[None, None, :] <= i[None, :, None] + offset)  # (B, Lq, Lk)
    visible = visible.expand(bsz, max_seqlen_q, max_seqlen_k)
    has_key = visible.any(-1)  # (B, Lq)
    # A row with no visible key would make softmax NaN in forward and backward; let it
    # see key 0 and zero its output instead, so its gradient is exactly zero.
    safe = visible.clone()
    safe[..., 0] |= ~has_key
    blocked = ~safe[:, None].repeat(1, 1, group, 1)  # (B, 1, G*Lq, Lk)
    return PaddingPlan(b_q, pos_q, b_k, pos_k, blocked, has_key)


def varlen_attention_reference(
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
    dropout_mask: torch.Tensor | None = None,
    plan_cache: dict | None = None,
) -> torch.Tensor:
    """Plain PyTorch `varlen_attention`: pad, masked softmax attention, unpad. The core is
    explicit scores on CPU up to `MATH_PATH_MAX_KEYS` keys, SDPA beyond (where the scores would
    cost too much memory) and on every other device (`sdpa_core`).

    `dropout_mask`, when given, is a `(B, Hq, max_seqlen_q, max_seqlen_k)` bool keep-mask
    applied instead of random dropout (tests use it to replay a kernel's dropout). `plan_cache`
    as `varlen_attention`'s.
    """
    n_q, hq, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    bsz = cu_seqlens_q.numel() - 1
    group = hq // hkv
    # What a plan depends on beyond the layout the cache belongs to; `seqused_k` plans are not kept.
    key = (causal, group, n_q, k.shape[0], max_seqlen_q, max_seqlen_k)
    cache = plan_cache if seqused_k is None else None
    plan = None if cache is None else cache.get(key)
    if plan is None:
        plan = padding_plan(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, n_q, k.shape[0],
                            causal=causal, group=group, seqused_k=seqused_k)
        if cache is not None:
            cache[key] = plan

    qp = q.new_zeros(bsz, max_seqlen_q, hq, d).index_put((plan.b_q, plan.pos_q), q)
    kp = k.new_zeros(bsz, max_seqlen_k, hkv, d).index_put((plan.b_k, plan.pos_k), k)
    vp = v.new_zeros(bsz, max_seqlen_k, hkv, d).index_put((plan.b_k, plan.pos_k), v)
    qp, kp, vp = (t.transpose(1, 2) for t in (qp, kp, vp))  # (B, H, L, d)
    # GQA without copying K/V: the G query heads of a K/V head become G blocks of query rows.
    qp = qp.reshape(bsz, hkv, group * max_seqlen_q, d)  # (B, Hkv, G*Lq, d)

    if dropout_mask is not None or (max_seqlen_k <= MATH_PATH_MAX_KEYS and not sdpa_core(q)):
        # Explicit softmax: at these lengths it is several times faster on CPU than SDPA's
        # fused kernel (whose bf16 backward is slow), and it can replay a given dropout mask.
        # Scores in fp32 at least, but fp64 stays fp64 (fp64 gradchecks).
        acc = torch.promote_types(q.dtype, torch.float32)
        s = torch.matmul(qp, kp.transpose(-1, -2)).to(acc) * scale  # (B, Hkv, G*Lq, Lk)
        p = torch.softmax(s.masked_fill(plan.blocked, float("-inf")), dim=-1)
        if dropout_mask is not None:
            keep = dropout_mask.reshape(bsz, hkv, group * max_seqlen_q, max_seqlen_k)
            p = p * keep.to(p.dtype) / (1.0 - dropout_p)
        elif dropout_p > 0.0:
            p = dropout(p, dropout_p)
        out = torch.matmul(p.to(vp.dtype), vp)  # (B, Hkv, G*Lq, d)
    else:
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=~plan.blocked, dropout_p=dropout_p, scale=scale)
    out = out.view(bsz, hq, max_seqlen_q, d) * plan.has_key[:, None, :, None].to(out.dtype)  # (B, Hq, Lq, d)
    return out.transpose(1, 2)[plan.b_q, plan.pos_q]  # (Nq, Hq, d)


def padded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    *,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention in the padded layout Hugging Face uses, routed through `varlen_attention`.

    Args:
        q: `(B, Hq, Lq, d)`; k, v: `(B, Hkv, Lk, d)`.
        key_padding_mask: `(B, Lk)` bool/int, True/1 = real token, or None (no padding).
            Padding may sit on either side; query row i of a sample is aligned with
            key row i + (Lk - Lq) (the KV-cache convention).
    Returns:
        `(B, Lq, Hq, d)`; rows of padded queries are zeros.
    """
    bsz, hq, lq, d = q.shape
    lk = k.shape[2]
    if key_padding_mask is None:
        keep_k = torch.ones(bsz, lk, dtype=torch.bool, device=q.device)
    else:
        if key_padding_mask.shape != (bsz, lk):
            raise ValueError(
                f"key_padding_mask: expected shape {(bsz, lk)}, found {tuple(key_padding_mask.shape)}"
            )
        keep_k = key_padding_mask.bool()
    keep_q = keep_k[:, lk - lq:]
    lens_q = keep_q.sum(1, dtype=torch.int32)
    lens_k = keep_k.sum(1, dtype=torch.int32)
    cu_q = F.pad(lens_q.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
    qt = q.transpose(1, 2)[keep_q]  # (Nq, Hq, d)
    kt = k.transpose(1, 2)[keep_k]
    vt = v.transpose(1, 2)[keep_k]
    out = varlen_attention(
        qt, kt, vt, cu_q, cu_k, lq, lk,
        causal=causal, scale=scale, dropout_p=dropout_p, backend=backend,
    )
    full = out.new_zeros(bsz, lq, hq, d)
    full[keep_q] = out
    return full


def _rows_to_padded(cu_seqlens: torch.Tensor, lens: torch.Tensor, n_rows: int):
    """Map packed rows to (sample, position) pairs. Rows past the last span map nowhere."""
    bsz = lens.numel()
    b = torch.repeat_interleave(torch.arange(bsz, device=lens.device), lens, output_size=n_rows)
    pos = torch.arange(n_rows, device=lens.device) - cu_seqlens.long()[b]
    return b, pos


def _check_varlen(q, k, v, cu_q, cu_k, seqused_k) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"varlen_attention: q, k, v must be (N, H, d); found {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"varlen_attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"varlen_attention: head dims differ: q has {q.shape[2]}, k has {k.shape[2]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"varlen_attention: query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
        )
    if cu_q.shape != cu_k.shape or cu_q.dim() != 1:
        raise ValueError(
            f"varlen_attention: cu_seqlens_q and cu_seqlens_k must both be (B+1,); "
            f"found {tuple(cu_q.shape)} and {tuple(cu_k.shape)}"
        )
    if seqused_k is not None and seqused_k.shape != (cu_q.numel() - 1,):
        raise ValueError(
            f"varlen_attention: seqused_k must be ({cu_q.numel() - 1},), found {tuple(seqused_k.shape)}"
        )
