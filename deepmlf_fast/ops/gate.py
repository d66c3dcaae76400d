"""The gate of a gated residual branch: `out = x + gate(alpha) * branch`.

The one owner of the gate nonlinearity. The fused kernels take the gate's value, so the
derivative of the nonlinearity is autograd's, here, for every backend.
"""

from __future__ import annotations

import torch

GATES = ("sigmoid", "tanh")


def gate_value(alpha: torch.Tensor, gate: str) -> torch.Tensor:
    """`sigmoid(alpha)` or `tanh(alpha)`, same shape as `alpha` (differentiable)."""
    if gate == "sigmoid":
        return torch.sigmoid(alpha)
    if gate == "tanh":
        return torch.tanh(alpha)
    raise ValueError(f"gate: expected one of {GATES}, found {gate!r}")
