"""Gated residual linear as an op: `out = x + g * linear(h)`, the epilogue of a Flamingo-style
gated block (output projection, gate, residual).

On the Triton backend a bias-free `nn.Linear` runs as one GEMM launch with the gate and the
residual in its epilogue (`deepmlf_kernels.gated_linear`); anything else (a quantized or
adapter-wrapped projection, a bias, the reference backend) is the plain torch expression.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from deepmlf_fast.ops.dispatch import kernel_dtype, resolve_backend


def gated_residual_linear(x: torch.Tensor, h: torch.Tensor, linear: nn.Module, gate: torch.Tensor,
                          backend: str = "auto") -> torch.Tensor:
    """`x + gate * linear(h)`: x `(..., N)`, h `(..., K)`, gate `(1,)` or `(N,)` (a value, e.g.
    `tanh(alpha)`), differentiable in all of them. Returns `(..., N)` in x's dtype."""
    if type(linear) is nn.Linear and linear.bias is None \
            and resolve_backend(backend, x, ("gated_linear",)) == "triton":
        from deepmlf_kernels.gated_linear import gated_linear

        ct = kernel_dtype(x, linear.weight.dtype)  # one dtype for the GEMM operands
        return gated_linear(x, h.to(ct), linear.weight.to(ct), gate)
    return x + gate * linear(h)
