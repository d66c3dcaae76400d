"""The learned gate of a gated residual branch, and the pre-norm choice shared by the layers."""

from __future__ import annotations

import torch
import torch.nn as nn

from deepmlf_fast.ops.gate import GATES, gate_value

NORMS = ("layernorm", "rmsnorm")


class Gate(nn.Module):
    """`gate() = sigmoid(alpha)` or `tanh(alpha)`; alpha is `(1,)` (scalar) or `(size,)`.

    Owns its parameter (`alpha`); the nonlinearity is `deepmlf_fast.ops.gate.gate_value`.
    DeepMLF's gates are sigmoid at alpha = 0 (half open); Flamingo's are tanh at 0 (closed).
    """

    def __init__(self, kind: str = "sigmoid", init: float = 0.0, size: int = 1):
        super().__init__()
        if kind not in GATES:
            raise ValueError(f"Gate: kind must be one of {GATES}, found {kind!r}")
        self.kind = kind
        self.alpha = nn.Parameter(torch.full((size,), float(init)))

    def forward(self) -> torch.Tensor:
        """The gate value, shaped like `alpha`."""
        return gate_value(self.alpha, self.kind)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, size={self.alpha.numel()}"


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """`nn.LayerNorm` (with bias) or `nn.RMSNorm` over `dim`."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"norm: expected one of {NORMS}, found {kind!r}")
