"""Learnable tokens appended to a sequence (DeepMLF's fusion tokens, Perceiver-style latents)."""

from __future__ import annotations

import torch
import torch.nn as nn


class FusionTokens(nn.Module):
    """A `(n, dim)` table (`weight`) initialised N(0, init_std^2); `forward(batch)` broadcasts it
    to `(batch, n, dim)` (a view: no copy). Fuses nothing: it is the table the fused layers'
    queries start from."""

    def __init__(self, n: int, dim: int, init_std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, dim) * init_std)

    @classmethod
    def from_module(cls, source: nn.Module | torch.Tensor) -> "FusionTokens":
        """A copy of another learned-token table: an `nn.Embedding(n, dim)` (prompt tuning) or an
        `(n, dim)` tensor (Perceiver latents, Q-Former queries)."""
        weight = source.weight if isinstance(source, nn.Module) else source
        if weight.dim() != 2:
            raise ValueError(f"FusionTokens.from_module: expected an (n, dim) table, found shape {tuple(weight.shape)}")
        tokens = cls(*weight.shape)
        tokens.weight = nn.Parameter(weight.detach().clone())
        return tokens

    def forward(self, batch_size: int) -> torch.Tensor:
        """`(batch_size, n, dim)`, every sample the same `n` tokens (gradients sum over the batch)."""
        return self.weight.expand(batch_size, -1, -1)

    @property
    def n(self) -> int:
        return self.weight.shape[0]
