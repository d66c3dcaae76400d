"""Learnable tokens appended to a sequence (DeepMLF's fusion tokens, Perceiver-style latents)."""

from __future__ import annotations

import torch
import torch.nn as nn


class FusionTokens(nn.Module):
    """A `(n, dim)` table (`weight`) initialised N(0, init_std^2); `forward(batch)` broadcasts it
    to `(batch, n, dim)` (a view: no copy)."""

    def __init__(self, n: int, dim: int, init_std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, dim) * init_std)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.expand(batch_size, -1, -1)

    @property
    def n(self) -> int:
        return self.weight.shape[0]
