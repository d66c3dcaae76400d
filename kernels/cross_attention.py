"""Gated cross-attention from fusion tokens to a narrow AV sequence, on the Triton kernels.

    out = x + gate(alpha) * dropout(W_o · MHA(q = norm(x) W_q^T, k = A W_k^T, v = A W_v^T))

Semantics are those of `deepmlf_fast.ops.cross_attention` (which also defines the
"plain" and "absorbed" evaluation orders). This file only wires the pieces:

    norm, query projection          torch (F.layer_norm / F.rms_norm, one GEMM)
    [plain] K/V projection          torch (one GEMM; K and V are strided views of it)
    attention                       1 launch: varlen attention kernel, non-causal, one
                                    "sample" per batch row (cu_seqlens_q = b*F,
                                    cu_seqlens_k = b*L, seqused_k = av_lengths)
    output projection, dropout,     1 launch: gated-linear GEMM with fused epilogue
    gate, residual

so attention + gate + residual take two launches in the forward. In the absorbed form the
kernel runs multi-query attention (Hkv = 1) whose single key = value head is A itself
(head dim Dkv = 30, padded to 32 in the kernel), and the output GEMM uses N_o^T.

Supports every argument of `gated_cross_attention`: LayerNorm/RMSNorm, sigmoid/tanh gates,
scalar or per-channel alpha, any softmax scale, ragged `av_lengths` (0 gives `out == x`
and zero gradients through the attention branch), empty AV (L = 0), attention and residual
dropout with replayable masks (`gated_cross_attention_dropout_masks`). Gradients flow to
x, A, the norm parameters, every weight and alpha.

Does not fuse the norm and query projection into the attention kernel (they are cuBLAS
GEMMs and cost less than the launch they would save at F = 8-20), nor the K/V projection
(precompute it for all MM blocks at once in the plain form, or use the absorbed form).
"""

from __future__ import annotations

import math

import torch

from deepmlf_fast.kernels.attention import attention_dropout_mask, new_seed, varlen_attention_triton
from deepmlf_fast.kernels.gated_linear import gated_linear, gated_linear_dropout_mask
from deepmlf_fast.kernels.projections import absorbed_weights, normalize


def gated_cross_attention_triton(
    x: torch.Tensor,
    av: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    w_q: torch.Tensor,
    w_kv: torch.Tensor,
    w_o: torch.Tensor,
    alpha: torch.Tensor,
    *,
    n_heads: int,
    norm: str = "layernorm",
    norm_eps: float = 1e-5,
    gate: str = "sigmoid",
    scale: float | None = None,
    av_lengths: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    resid_dropout_p: float = 0.0,
    form: str = "plain",
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton `gated_cross_attention` (arguments and semantics as the public op; `form`
    must already be "plain" or "absorbed").

    Args (beyond the public op's):
        seed: optional `(2,)` int64 tensor on x's device, the Philox seeds of the attention
            and residual dropout; drawn from torch's generator when None. Replay the masks
            with `gated_cross_attention_dropout_masks(seed, ...)`.

    Returns:
        `(B, F, D)` in x's dtype.
    """
    bsz, n_q, dim = x.shape
    n_kv, dkv = av.shape[1], av.shape[2]
    head_dim = dim // n_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if seed is None and (dropout_p > 0.0 or resid_dropout_p > 0.0):
        seed = new_seed(x.device, 2)
    attn_seed, resid_seed = (None, None) if seed is None else (seed[0:1], seed[1:2])

    # The kernels take one dtype for q/k/v and for h/w: autocast's, when it is on (custom
    # ops are not autocast), else x's. The residual x keeps its own dtype.
    ct = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    xn = normalize(x, norm_weight, norm_bias, norm, norm_eps).to(ct)
    av = av.to(ct)
    if form == "absorbed":
        m_q, n_o = (w.to(ct) for w in absorbed_weights(w_q, w_kv, w_o, n_heads))  # (D, H*Dkv), (H*Dkv, D)
        q = (xn @ m_q).view(bsz * n_q, n_heads, dkv)  # (B*F, H, Dkv)
        k = v = av.reshape(bsz * n_kv, 1, dkv)  # (B*L, 1, Dkv): one kv head shared by all H
        w_out = n_o.t()  # (D, H*Dkv), nn.Linear layout
    elif form == "plain":
        q = (xn @ w_q.to(ct).t()).view(bsz * n_q, n_heads, head_dim)  # (B*F, H, Dh)
        kv = av @ w_kv.to(ct).t()  # (B, L, 2D)
        k = kv[..., :dim].reshape(bsz * n_kv, n_heads, head_dim)  # (B*L, H, Dh), strided view
        v = kv[..., dim:].reshape(bsz * n_kv, n_heads, head_dim)
        w_out = w_o.to(ct)
    else:
        raise ValueError(f"gated_cross_attention_triton: form must be 'plain' or 'absorbed', found {form!r}")

    steps = torch.arange(bsz + 1, dtype=torch.int32, device=x.device)
    ctx = varlen_attention_triton(
        q, k, v, steps * n_q, steps * n_kv, n_q, n_kv,
        causal=False, scale=scale, dropout_p=dropout_p, seqused_k=av_lengths, seed=attn_seed,
    )  # (B*F, H, Dh or Dkv)
    return gated_linear(
        x, ctx.view(bsz, n_q, -1), w_out, alpha, gate=gate, dropout_p=resid_dropout_p, seed=resid_seed,
    )


def gated_cross_attention_dropout_masks(
    seed: torch.Tensor,
    bsz: int,
    n_q: int,
    n_kv: int,
    dim: int,
    n_heads: int,
    dropout_p: float,
    resid_dropout_p: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The keep-masks `gated_cross_attention_triton(..., seed=seed)` applies.

    Returns:
        `attn_dropout_mask (B, H, F, L)` and `resid_dropout_mask (B, F, D)` bool (None
        where that dropout is off), ready for `gated_cross_attention_reference`.
    """
    attn = resid = None
    if dropout_p > 0.0:
        attn = attention_dropout_mask(seed[0:1], bsz, n_heads, n_q, n_kv, dropout_p)
    if resid_dropout_p > 0.0:
        resid = gated_linear_dropout_mask(seed[1:2], bsz * n_q, dim, resid_dropout_p).view(bsz, n_q, dim)
    return attn, resid
