"""Gated cross-attention as a layer: the fused op `deepmlf_fast.ops.cross_attention`."""

from __future__ import annotations

import torch
import torch.nn as nn

from deepmlf_fast.layers.gate import Gate, copy_norm, make_norm, norm_kind
from deepmlf_fast.ops.cross_attention import gated_cross_attention


class GatedCrossAttention(nn.Module):
    """`out = x + gate * dropout(W_o · MHA(q = norm(x) W_q^T, k = A W_k^T, v = A W_v^T))`.

    Queries are a few tokens `x (B, F, D)` (a packed model gathers them: `model.fusion.MMBlock`);
    keys and values come from a narrow sequence `A (B, L, kv_dim)` with optional per-sample
    lengths. Norm, projections, attention, dropout, gate and residual run as one op
    (`ops.cross_attention.gated_cross_attention`): on CUDA two Triton launches, the varlen
    attention kernel and a GEMM whose epilogue applies W_o, dropout, the gate and the residual;
    the PyTorch reference elsewhere. The evaluation order (plain, or absorbed multi-query
    attention in kv_dim space) is chosen by shape. `from_module` copies an open_flamingo-style
    block's attention half.

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

    @classmethod
    def from_module(cls, block: nn.Module, *, gate: str = "tanh", form: str = "auto") -> "GatedCrossAttention":
        """The gated cross-attention half of an open_flamingo-style block, weights copied.

        `block.attn` holds `norm` (LayerNorm or RMSNorm), `to_q (inner, D)`, `to_kv (2*inner, kv_dim)`
        ([W_k; W_v], this layer's `kv_proj` layout), `to_out (D, inner)`, all bias-free, and
        `heads`; `block.attn_gate` is the gate parameter (tanh in Flamingo). The softmax scale is
        `1/sqrt(inner/heads)` as there. Needs inner == D (the fused op projects D -> D).
        """
        attn = block.attn
        inner, dim = attn.to_q.weight.shape
        if inner != dim:
            raise ValueError(f"GatedCrossAttention.from_module: expected heads * dim_head == dim ({dim}), found {inner}")
        if any(getattr(attn, n).bias is not None for n in ("to_q", "to_kv", "to_out")):
            raise ValueError("GatedCrossAttention.from_module: expected bias-free to_q / to_kv / to_out projections")
        kind, eps = norm_kind(attn.norm)
        alpha = block.attn_gate
        layer = cls(dim, attn.to_kv.weight.shape[1], attn.heads, norm=kind, norm_eps=eps, gate=gate, form=form)
        layer.gate = Gate.from_module(alpha, gate)
        layer.to(device=alpha.device, dtype=attn.to_q.weight.dtype)
        copy_norm(layer.norm, attn.norm)
        with torch.no_grad():
            for target, source in ((layer.q_proj, attn.to_q), (layer.kv_proj, attn.to_kv), (layer.o_proj, attn.to_out)):
                target.weight.copy_(source.weight)
        return layer

    def forward(self, x: torch.Tensor, av: torch.Tensor, av_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x `(B, F, D)` -> `(B, F, D)`; av `(B, L, kv_dim)`; av_lengths `(B,)` valid steps (0
        leaves a sample's x unchanged)."""
        p = self.dropout if self.training else 0.0
        return gated_cross_attention(
            x, av.to(x.dtype), self.norm.weight, getattr(self.norm, "bias", None), self.q_proj.weight,
            self.kv_proj.weight, self.o_proj.weight, self.gate.alpha, n_heads=self.n_heads, norm=self.norm_kind,
            norm_eps=self.norm.eps, gate=self.gate.kind, scale=self.scale, av_lengths=av_lengths, dropout_p=p,
            resid_dropout_p=p, form=self.form, backend=self.backend,
        )
