"""Gated cross-attention as a layer: the fused op `deepmlf_fast.ops.cross_attention`."""

from __future__ import annotations

import torch
import torch.nn as nn

from deepmlf_fast.layers.gate import Gate, make_norm
from deepmlf_fast.ops.cross_attention import gated_cross_attention


class GatedCrossAttention(nn.Module):
    """`out = x + gate * dropout(W_o · MHA(q = norm(x) W_q^T, k = A W_k^T, v = A W_v^T))`.

    Queries are a few tokens `x (B, F, D)`; keys and values come from a narrow sequence
    `A (B, L, kv_dim)` with optional per-sample lengths. Norm, projections, attention,
    dropout, gate and residual run as one op (two Triton launches on CUDA); the evaluation
    order (plain, or absorbed multi-query attention in kv_dim space) is chosen by shape.

    Args:
        dim: D; kv_dim: width of A; n_heads: H (D % H == 0).
        norm: "layernorm" | "rmsnorm"; norm_eps.
        gate: "sigmoid" | "tanh"; gate_init: alpha's initial value; gate_size: 1 or D.
        scale: softmax scale (default 1/sqrt(D/H)); dropout: attention and output dropout.
        form: "auto" | "plain" | "absorbed".
    Parameters: `norm.*`, `q_proj.weight (D, D)`, `kv_proj.weight (2D, kv_dim)` ([W_k; W_v]),
    `o_proj.weight (D, D)`, `gate.alpha`; no biases.
    """

    def __init__(self, dim: int, kv_dim: int, n_heads: int, *, norm: str = "layernorm", norm_eps: float = 1e-5,
                 gate: str = "sigmoid", gate_init: float = 0.0, gate_size: int = 1, scale: float | None = None,
                 dropout: float = 0.0, form: str = "auto"):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"GatedCrossAttention: n_heads {n_heads} does not divide dim {dim}")
        self.n_heads = n_heads
        self.norm_kind = norm
        self.scale = scale
        self.dropout = dropout
        self.form = form
        self.backend = "auto"
        self.norm = make_norm(norm, dim, norm_eps)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.gate = Gate(gate, gate_init, gate_size)

    def forward(self, x: torch.Tensor, av: torch.Tensor, av_lengths: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """x `(B, F, D)` -> `(B, F, D)`; or x packed `(N, D)` with `rows (B*F,)` naming the
        query rows sample-major (F = len(rows) / B), only those rows change.
        av `(B, L, kv_dim)`; av_lengths `(B,)` valid steps (0 leaves a sample's x unchanged)."""
        if rows is not None:
            dim = x.shape[-1]
            q = x.index_select(0, rows).view(av.shape[0], -1, dim)
            return x.index_copy(0, rows, self.forward(q, av, av_lengths).reshape(-1, dim))
        p = self.dropout if self.training else 0.0
        return gated_cross_attention(
            x, av.to(x.dtype), self.norm.weight, getattr(self.norm, "bias", None), self.q_proj.weight,
            self.kv_proj.weight, self.o_proj.weight, self.gate.alpha, n_heads=self.n_heads, norm=self.norm_kind,
            norm_eps=self.norm.eps, gate=self.gate.kind, scale=self.scale, av_lengths=av_lengths, dropout_p=p,
            resid_dropout_p=p, form=self.form, backend=self.backend,
        )
