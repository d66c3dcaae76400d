"""The learned gate of a gated residual branch, and the pre-norm choice shared by the layers."""

from __future__ import annotations

import torch
import torch.nn as nn

from deepmlf_fast.ops.cross_attention import NORMS
from deepmlf_fast.ops.gate import GATES, gate_value



class Gate(nn.Module):
    """`gate() = sigmoid(alpha)` or `tanh(alpha)`; alpha is `(1,)` (scalar) or `(size,)`.

    Owns its parameter (`alpha`); the nonlinearity is `deepmlf_fast.ops.gate.gate_value`.
    DeepMLF's gates are sigmoid at alpha = 0 (half open); Flamingo's are tanh at 0 (closed).
    Fuses nothing itself: the fused layers read its value, and its derivative is autograd's.
    """

    def __init__(self, kind: str = "sigmoid", init: float = 0.0, size: int = 1):
        super().__init__()
        if kind not in GATES:
            raise ValueError(f"Gate: kind must be one of {GATES}, found {kind!r}")
        self.kind = kind
        self.alpha = nn.Parameter(torch.full((size,), float(init)))

    @classmethod
    def from_module(cls, source: nn.Module | torch.Tensor, kind: str = "tanh") -> "Gate":
        """A gate holding a copy of another implementation's gate parameter: a bare tensor
        (open_flamingo's `attn_gate`, mllama's `cross_attn_attn_gate`) or a module with exactly
        one parameter (torchtune's `TanhGate.scale`). `kind`: the nonlinearity it applies."""
        if isinstance(source, nn.Module):
            params = list(source.parameters())
            if len(params) != 1:
                raise ValueError(f"Gate.from_module: expected a module with one parameter, found {len(params)}")
            source = params[0]
        gate = cls(kind, size=source.numel())
        gate.alpha = nn.Parameter(source.detach().reshape(-1).clone())
        return gate

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


def norm_kind(norm: nn.Module) -> tuple[str, float]:
    """("layernorm" | "rmsnorm", eps) of an existing pre-norm (torch's or an HF-style RMSNorm
    with `weight` and `variance_epsilon`)."""
    if isinstance(norm, nn.LayerNorm):
        return "layernorm", norm.eps
    if isinstance(norm, nn.RMSNorm):
        return "rmsnorm", norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps
    if hasattr(norm, "variance_epsilon"):
        return "rmsnorm", norm.variance_epsilon
    raise ValueError(f"expected a LayerNorm or RMSNorm pre-norm, found a {type(norm).__name__}")


def copy_norm(target: nn.Module, source: nn.Module) -> None:
    """Copy a norm's weight (and bias, zero when the source has none) into `make_norm`'s module."""
    with torch.no_grad():
        target.weight.copy_(source.weight)
        if getattr(target, "bias", None) is not None:
            bias = getattr(source, "bias", None)
            if bias is None:
                target.bias.zero_()
            else:
                target.bias.copy_(bias)
