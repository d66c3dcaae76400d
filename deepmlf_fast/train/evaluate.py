"""Prediction and evaluation over a data loader (through the one step function)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from deepmlf_fast.metrics import msa_metrics
from deepmlf_fast.train.step import StepContext, forward_step

HEADS = ("pred", "pred_text", "pred_av", "pred_fusion")


@torch.no_grad()
def predict(model, loader, ctx: StepContext, desc: str = "predict") -> dict[str, np.ndarray]:
    """Run the model in eval mode; -> arrays `pred`, `pred_text`, `pred_av`, `pred_fusion`
    (mean over fusion tokens), `labels`, `index`, each `(N,)` in loader order, and
    `batch_l1` (each batch's mean |pred - y|, the official `Loss`)."""
    model.eval()
    cols: dict[str, list] = {k: [] for k in (*HEADS, "labels", "index", "batch_l1")}
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        step = forward_step(model, batch, ctx)
        out = step.out
        for head in HEADS:
            value = out[head].float()
            cols[head].append(value.mean(1) if head == "pred_fusion" else value)
        cols["labels"].append(step.batch.labels.float())
        cols["index"].append(step.batch.index)
        cols["batch_l1"].append(step.parts["task"].reshape(1))
    return {k: torch.cat(v).cpu().numpy() for k, v in cols.items()}


def predict_split(model, loader, ctx: StepContext, desc: str = "predict") -> dict[str, np.ndarray]:
    """`predict` over a whole split: in a distributed run each rank predicts its shard and the
    arrays are gathered from every rank (same keys and shapes as `predict`, `(N,)` each)."""
    p = predict(model, loader, ctx, desc)
    if getattr(loader.sampler, "world_size", 1) > 1:
        from deepmlf_fast.train.distributed import gather_predictions

        p = gather_predictions(p, loader.batch_size)
    return p


def split_metrics(p: dict[str, np.ndarray], dataset: str) -> dict[str, float]:
    """MMSA metrics of the multimodal prediction plus `Loss` (mean over batches of each
    batch's L1, the official model-selection value) and the single-head MAEs, from a split's
    `predict_split` arrays."""
    metrics = msa_metrics(p["pred"], p["labels"], dataset)
    metrics["Loss"] = float(p["batch_l1"].mean())
    for head in ("pred_text", "pred_av", "pred_fusion"):
        metrics[f"MAE_{head[5:]}"] = float(np.abs(p[head] - p["labels"]).mean())
    return metrics


def evaluate(model, loader, dataset: str, ctx: StepContext, desc: str = "eval") -> dict[str, float]:
    """`split_metrics` of the model's predictions over the loader's split."""
    return split_metrics(predict_split(model, loader, ctx, desc), dataset)
