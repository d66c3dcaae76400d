"""Plain PyTorch pieces of the gated cross-attention shared by its reference and its Triton
path: the pre-norm and the absorbed projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def absorbed_weights(w_q: torch.Tensor, w_kv: torch.Tensor, w_o: torch.Tensor, n_heads: int):
    """Fold the projections into `M_q (D, H*Dkv)` and `N_o (H*Dkv, D)`.

    `M_q[:, h] = W_q,h^T W_k,h` maps normalised queries straight to per-head scores
    against A; `N_o[h] = W_v,h^T W_o,h^T` maps per-head `P_h A` straight to the output.
    """
    dim, dkv = w_q.shape[0], w_kv.shape[1]
    head_dim = dim // n_heads
    wq_h = w_q.view(n_heads, head_dim, dim)  # (H, Dh, D)
    wk_h = w_kv[:dim].view(n_heads, head_dim, dkv)  # (H, Dh, Dkv)
    wv_h = w_kv[dim:].view(n_heads, head_dim, dkv)
    wo_h = w_o.view(dim, n_heads, head_dim)  # (D, H, Dh)
    m_q = torch.einsum("hed,hek->dhk", wq_h, wk_h).reshape(dim, n_heads * dkv)
    n_o = torch.einsum("hek,dhe->hkd", wv_h, wo_h).reshape(n_heads * dkv, dim)
    return m_q, n_o


def normalize(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm: str, eps: float) -> torch.Tensor:
    """LayerNorm (with optional bias) or RMSNorm of `x (..., D)` over its last dimension."""
    if norm == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)
