"""LM self-attention baselines over the official padded layout `[text (padded to L) ; F fusion]`.

The official code pads every transcript to L tokens, appends the F fusion tokens and hands the
Hugging Face model a key-padding mask; the model turns it into a dense `(B, 1, T, T)` mask,
T = L + F (deepmlf-reference.md §1.6):

    visible[b, i, j] = (j <= i) and (j < len_b or j >= L)

(causal, and padded text keys hidden). Pad rows are still computed as queries. The functions below
are the ways to evaluate that with stock PyTorch; `padded_visibility` builds the mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def padded_visibility(lengths: torch.Tensor, text_len: int, n_fusion: int) -> torch.Tensor:
    """Dense `(B, T, T)` bool mask of the official layout (True = may attend)."""
    t = text_len + n_fusion
    i = torch.arange(t, device=lengths.device)
    causal = i[None, :] <= i[:, None]  # (T, T): key j <= query i
    key_ok = (i[None, :] < lengths[:, None]) | (i[None, :] >= text_len)  # (B, T)
    return causal[None] & key_ok[:, None, :]


def eager_masked_attention(q, k, v, additive_mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Hugging Face 'eager' style: repeat K/V heads for GQA, explicit scores + additive mask,
    fp32 softmax, `P V`. q `(B, Hq, T, d)`, k/v `(B, Hkv, T, d)`, mask `(B, 1, T, T)` float."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale + additive_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(B, T, T)` bool -> `(B, 1, T, T)` additive mask (0 or the dtype's minimum), HF eager style."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=visible.device)
    return torch.where(visible, zero, low)[:, None]


def sdpa_dense_attention(q, k, v, visible: torch.Tensor) -> torch.Tensor:
    """SDPA with the dense bool mask `(B, T, T)` (what HF's 'sdpa' path does with padding)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], enable_gqa=q.shape[1] != k.shape[1])


def sdpa_per_sample(q, k, v, cu_seqlens: list[int]) -> torch.Tensor:
    """SDPA on the unpadded samples, one causal call per sample.

    q `(N, Hq, d)`, k/v `(N, Hkv, d)` packed as `[text_b ; fusion_b]` per sample, `cu_seqlens` host
    offsets. Each sample is square, so `is_causal` (top-left) is the packed visibility exactly.
    (Nested jagged tensors would do this in one call, but torch's NJT SDPA rejects `is_causal`.)
    """
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n, d)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def flex_mask_mod(lengths: torch.Tensor, text_len: int):
    """FlexAttention `mask_mod` equivalent to `padded_visibility`."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < lengths[b]) | (kv_idx >= text_len))

    return mask_mod
