"""The gated cross-attention half of an MM block, computed the way the official code does.

Reference description (deepmlf-reference.md §1.7): on the fusion tokens only,

    H_f <- H_f + sigmoid(a1) * resid_dropout(W_O · merge_heads(softmax(Q K^T / sqrt(D)) V))
    Q = LN1(H_f) W_Q          (D -> D, no bias)
    [K ; V] = A W_KV          (30 -> 2D, one matrix, split in halves, no bias)

with 16 heads of size D/16, attention dropout on the probabilities and a softmax scale of
1/sqrt(D), the full model width (not the head size). Every step is a separate PyTorch op: three
`nn.Linear` layers, an explicit `Q K^T` matmul, scaling, softmax, dropout, `P V`, a head merge,
the output projection and the gate. This is the eager provider of the cross-attention benchmark
and the cross-attention inside `official_deepmlf.OfficialMMBlock`.

`SDPAGatedCrossAttention` is the same module with the attention core replaced by
`torch.nn.functional.scaled_dot_product_attention` (same scale), i.e. what a careful PyTorch
user would write without custom kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class OfficialGatedCrossAttention(nn.Module):
    """Pre-norm, multi-head cross-attention from queries `x (B, F, D)` to `av (B, L, Dkv)`, with a
    sigmoid-gated residual. Eager: every step is its own op.

    Args:
        dim: D, width of the queries and of the output.
        kv_dim: Dkv, width of the AV sequence (30 in DeepMLF).
        n_heads: number of heads (16 in every released recipe).
        norm: 'layernorm' (GPT-2 family) or 'rmsnorm' (Llama family) pre-norm.
        eps: epsilon of the pre-norm.
        scale: softmax scale; None means the official 1/sqrt(D).
        dropout: attention and residual dropout probability (active in training mode).
    """

    def __init__(
        self,
        dim: int,
        kv_dim: int,
        n_heads: int,
        *,
        norm: str = "layernorm",
        eps: float = 1e-5,
        scale: float | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.dim, self.n_heads = dim, n_heads
        self.scale = 1.0 / math.sqrt(dim) if scale is None else scale
        self.norm = nn.LayerNorm(dim, eps=eps) if norm == "layernorm" else nn.RMSNorm(dim, eps=eps)
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.w_o = nn.Linear(dim, dim, bias=False)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.alpha = nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def load_weights(self, norm_weight, norm_bias, w_q, w_kv, w_o, alpha) -> "OfficialGatedCrossAttention":
        """Copy weights given in `gated_cross_attention`'s layout (nn.Linear (out, in))."""
        self.norm.weight.copy_(norm_weight)
        if norm_bias is not None:
            self.norm.bias.copy_(norm_bias)
        self.w_q.weight.copy_(w_q)
        self.w_kv.weight.copy_(w_kv)
        self.w_o.weight.copy_(w_o)
        self.alpha.copy_(alpha.reshape(1))
        return self

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Explicit attention core: `(B, H, F, Dh) x (B, H, L, Dh)` -> `(B, H, F, Dh)`."""
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale  # (B, H, F, L)
        probs = self.attn_dropout(torch.softmax(scores, dim=-1))
        return torch.matmul(probs, v)

    def forward(self, x: torch.Tensor, av: torch.Tensor) -> torch.Tensor:
        """x `(B, F, D)`, av `(B, L, Dkv)` -> `(B, F, D)` (residual included)."""
        bsz, n_q, dim = x.shape
        n_kv = av.shape[1]
        h, dh = self.n_heads, dim // self.n_heads
        q = self.w_q(self.norm(x)).view(bsz, n_q, h, dh).transpose(1, 2)  # (B, H, F, Dh)
        k, v = self.w_kv(av).split(dim, dim=-1)  # (B, L, D) each
        k = k.reshape(bsz, n_kv, h, dh).transpose(1, 2)  # (B, H, L, Dh)
        v = v.reshape(bsz, n_kv, h, dh).transpose(1, 2)
        ctx = self.attention(q, k, v).transpose(1, 2).reshape(bsz, n_q, dim)  # merge heads
        y = self.resid_dropout(self.w_o(ctx))
        return x + torch.sigmoid(self.alpha) * y


class SDPAGatedCrossAttention(OfficialGatedCrossAttention):
    """`OfficialGatedCrossAttention` with the attention core on PyTorch SDPA (same scale)."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.attn_dropout.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
