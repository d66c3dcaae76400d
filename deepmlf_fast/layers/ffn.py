"""Gated position-wise FFN: the second half of a Flamingo/DeepMLF gated block."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from deepmlf_fast.layers.gate import Gate, copy_norm, make_norm, norm_kind
from deepmlf_fast.ops.dropout import Dropout


class GatedFFN(nn.Module):
    """`x + gate * dropout(mlp(norm(x)))` around any position-wise `mlp` (D -> D).

    Args:
        mlp: the FFN (e.g. a copy of an LM block's MLP).
        dim: model width D; norm: "layernorm" | "rmsnorm"; norm_eps.
        gate: "sigmoid" | "tanh"; gate_init: alpha's initial value; dropout: on mlp's output.
    Parameters: `norm.*`, `mlp.*`, `gate.alpha`.

    Fuses nothing: the norm, the MLP as given and the gated residual are torch ops (the MLP may
    be a LoRA-wrapped or quantized copy, which no fixed kernel could take).
    """

    def __init__(self, mlp: nn.Module, dim: int, *, norm: str = "layernorm", norm_eps: float = 1e-5,
                 gate: str = "sigmoid", gate_init: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.norm = make_norm(norm, dim, norm_eps)
        self.mlp = mlp
        self.dropout = Dropout(dropout)
        self.gate = Gate(gate, gate_init)

    @classmethod
    def from_module(cls, block: nn.Module, *, gate: str = "tanh") -> "GatedFFN":
        """The gated FFN half of an open_flamingo-style block, copied: `block.ff` is
        `nn.Sequential(norm, *mlp)` (LayerNorm or RMSNorm first) and `block.ff_gate` its gate
        parameter (tanh in Flamingo)."""
        norm, *mlp = block.ff
        kind, eps = norm_kind(norm)
        alpha = block.ff_gate
        layer = cls(copy.deepcopy(nn.Sequential(*mlp)), norm.weight.shape[0], norm=kind, norm_eps=eps, gate=gate)
        layer.gate = Gate.from_module(alpha, gate)
        layer.to(device=alpha.device, dtype=norm.weight.dtype)
        copy_norm(layer.norm, norm)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `(..., D)` -> same shape."""
        return x + self.gate().to(x.dtype) * self.dropout(self.mlp(self.norm(x)))
