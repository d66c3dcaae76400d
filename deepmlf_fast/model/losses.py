"""DeepMLF training loss (reference §2.1):

    L = |y^ - y| + w_fusion * mean_k |y^_f,k - y| + w_av * |y^_av - y| + w_text * |y^_t - y| + w_clm * CE_text
"""

from __future__ import annotations

import torch

from deepmlf_fast.config import LossConfig


def deepmlf_loss(out: dict[str, torch.Tensor], labels: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the four L1 terms and the optional causal-LM term.

    `out` holds `pred (B,)`, `pred_fusion (B, n)`, `pred_av (B,)`, `pred_text (B,)` and,
    when the CLM term is on, `clm_loss` (scalar). Returns the total and its detached parts (tensors, so
    logging costs no device synchronisation until it reads them).
    """
    y = labels.to(out["pred"].dtype)
    parts = {
        "task": (out["pred"] - y).abs().mean(),
        "fusion": (out["pred_fusion"] - y[:, None]).abs().mean(),
        "av": (out["pred_av"] - y).abs().mean(),
        "text": (out["pred_text"] - y).abs().mean(),
    }
    total = parts["task"] + cfg.w_fusion * parts["fusion"] + cfg.w_av * parts["av"] + cfg.w_text * parts["text"]
    if cfg.w_clm > 0 and out.get("clm_loss") is not None:
        parts["clm"] = out["clm_loss"]
        total = total + cfg.w_clm * parts["clm"]
    return total, {k: v.detach() for k, v in parts.items()}
