"""The gate of a gated residual branch: `out = x + gate(alpha) * branch`.

The one owner of the gate nonlinearity. The fused kernels take the gate's value, so the
derivative of the nonlinearity is autograd's, here, for every backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `config` reads GATES: importing this module must not import torch (`deepmlf --help`)
    import torch

_NONLINEARITY = {"sigmoid": lambda a: a.sigmoid(), "tanh": lambda a: a.tanh()}
"""Every gate kind and its nonlinearity: a new kind is one entry here (`config.GateKind`, the
CLI's choices and the layers' checks are made from `GATES`)."""
GATES = tuple(_NONLINEARITY)


def gate_value(alpha: torch.Tensor, gate: str) -> torch.Tensor:
    """The nonlinearity of kind `gate` (`sigmoid(alpha)`, `tanh(alpha)`), same shape as `alpha` (differentiable)."""
    if gate not in _NONLINEARITY:
        raise ValueError(f"gate: expected one of {GATES}, found {gate!r}")
    return _NONLINEARITY[gate](alpha)
