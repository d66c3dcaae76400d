"""Gated position-wise FFN: the second half of a Flamingo/DeepMLF gated block."""

from __future__ import annotations

import torch
import torch.nn as nn

from deepmlf_fast.layers.gate import Gate, make_norm


class GatedFFN(nn.Module):
    """`x + gate * dropout(mlp(norm(x)))` around any position-wise `mlp` (D -> D).

    Args:
        mlp: the FFN (e.g. a copy of an LM block's MLP).
        dim: model width D; norm: "layernorm" | "rmsnorm"; norm_eps.
        gate: "sigmoid" | "tanh"; gate_init: alpha's initial value; dropout: on mlp's output.
    Parameters: `norm.*`, `mlp.*`, `gate.alpha`.
    """

    def __init__(self, mlp: nn.Module, dim: int, *, norm: str = "layernorm", norm_eps: float = 1e-5,
                 gate: str = "sigmoid", gate_init: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.norm = make_norm(norm, dim, norm_eps)
        self.mlp = mlp
        self.dropout = nn.Dropout(dropout)
        self.gate = Gate(gate, gate_init)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x `(..., D)` -> same shape. With `rows` (x packed `(N, D)`), only those rows change."""
        if rows is None:
            return x + self.gate().to(x.dtype) * self.dropout(self.mlp(self.norm(x)))
        return x.index_copy(0, rows, self.forward(x.index_select(0, rows)))
