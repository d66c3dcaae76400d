"""Every loss term of both curriculum stages (reference §2.1, §2.2, §2.8), in one place.

Stage 2 (DeepMLF):

    L = |y^ - y| + w_fusion * mean_k |y^_f,k - y| + w_av * |y^_av - y| + w_text * |y^_t - y| + w_clm * CE_text

Stage 1 (AV encoder alone): `|y^_av - y|` on the last AV step's regression.

The model's forward returns what the terms need (predictions; for the CLM term the text rows'
final states, the LM head and the targets, `CLMInputs`), and the terms are computed here.
Parts are returned detached, as tensors, so logging costs no device synchronisation until
someone reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepmlf_fast.config import LossConfig
from deepmlf_fast.ops.linear_cross_entropy import linear_cross_entropy


@dataclass
class CLMInputs:
    """What the causal-LM term needs: `hidden (N_text, D)` final-norm text states, the LM head
    `weight (V, D)` and next-token `targets (N_text,)` (`IGNORE_INDEX` where none)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor


def l1(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in fp32 (as autocast runs `l1_loss`); `pred (B,)` or `(B, n)`
    (every column against the label)."""
    y = labels.float()
    return (pred.float() - (y[:, None] if pred.dim() == 2 else y)).abs().mean()


def deepmlf_loss(out: dict, labels: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-2 loss: the weighted sum of the four L1 terms and, when `out` carries `clm`
    (`CLMInputs`) and `w_clm > 0`, the causal-LM cross-entropy.

    `out` holds `pred (B,)`, `pred_fusion (B, n)`, `pred_av (B,)`, `pred_text (B,)`.
    Returns the total and its detached parts (`task`, `fusion`, `av`, `text`, [`clm`]).
    """
    parts = {
        "task": l1(out["pred"], labels),
        "fusion": l1(out["pred_fusion"], labels),
        "av": l1(out["pred_av"], labels),
        "text": l1(out["pred_text"], labels),
    }
    total = parts["task"] + cfg.w_fusion * parts["fusion"] + cfg.w_av * parts["av"] + cfg.w_text * parts["text"]
    clm: CLMInputs | None = out.get("clm")
    if cfg.w_clm > 0 and clm is not None:
        parts["clm"] = linear_cross_entropy(clm.hidden, clm.weight, clm.targets)
        total = total + cfg.w_clm * parts["clm"]
    return total, {k: v.detach() for k, v in parts.items()}


def av_pretrain_loss(out: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-1 loss: L1 of the AV encoder's regression `pred (B,)`."""
    task = l1(out["pred"], labels)
    return task, {"task": task.detach()}
