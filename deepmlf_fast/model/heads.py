"""Regression heads (reference §1.9): fusion tokens, last text token, AV summary, and the
multimodal MLP whose output is the model's prediction."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Heads(nn.Module):
    """Four heads reading the final (post-norm) states.

    text:   Linear(D->1) on the last real text token `t* (B, D)`
    fusion: Linear(D->1) shared by every fusion token `(B, n, D)`
    av:     Linear(d_av->1) on the time-mean of A `(B, d_av)`
    task:   Linear(2D+d_av -> hidden) -> BatchNorm1d -> ReLU -> Linear(hidden -> 1)
            on concat(mean fusion token, t*, mean A); its output is the prediction.
    """

    def __init__(self, dim: int, av_dim: int, hidden: int):
        super().__init__()
        self.text = nn.Linear(dim, 1)
        self.fusion = nn.Linear(dim, 1)
        self.av = nn.Linear(av_dim, 1)
        self.task_in = nn.Linear(2 * dim + av_dim, hidden)
        self.task_norm = nn.BatchNorm1d(hidden)
        self.task_out = nn.Linear(hidden, 1)

    def forward(self, t_star: torch.Tensor, fusion: torch.Tensor, a_bar: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> dict of `pred (B,)`, `pred_text (B,)`, `pred_fusion (B, n)`, `pred_av (B,)`."""
        z = self.task_in(torch.cat([fusion.mean(1), t_star, a_bar], dim=-1))
        # BatchNorm cannot form batch statistics from one sample; a trailing batch of one
        # is normalised with the running statistics instead of crashing.
        use_batch_stats = self.training and z.shape[0] > 1
        z = F.batch_norm(
            z, self.task_norm.running_mean, self.task_norm.running_var, self.task_norm.weight,
            self.task_norm.bias, use_batch_stats, self.task_norm.momentum, self.task_norm.eps,
        )
        return {
            "pred": self.task_out(torch.relu(z)).squeeze(-1),
            "pred_text": self.text(t_star).squeeze(-1),
            "pred_fusion": self.fusion(fusion).squeeze(-1),
            "pred_av": self.av(a_bar).squeeze(-1),
        }
