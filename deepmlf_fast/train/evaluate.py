"""Prediction and evaluation over a data loader."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm.auto import tqdm

from deepmlf_fast.metrics import msa_metrics


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on the device's type, or a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def eval_in_bf16(cfg) -> bool:
    """Whether evaluation runs under bf16 autocast: when training does, or in official parity."""
    return cfg.train.precision == "bf16" or cfg.model.flags.eval_precision == "bf16"


def model_inputs(batch) -> dict:
    """The keyword arguments `DeepMLF.forward` takes, from a `Batch`."""
    return dict(
        input_ids=batch.input_ids, text_lengths=batch.text_lengths, audio=batch.audio, vision=batch.vision,
        audio_lengths=batch.audio_lengths, vision_lengths=batch.vision_lengths,
    )


@torch.no_grad()
def predict(model, loader, device: torch.device, bf16: bool, desc: str = "predict") -> dict[str, np.ndarray]:
    """Run the model in eval mode; -> arrays `pred`, `pred_text`, `pred_av`, `pred_fusion`
    (mean over fusion tokens), `labels`, `index`, each `(N,)` in loader order."""
    model.eval()
    cols: dict[str, list] = {k: [] for k in ("pred", "pred_text", "pred_av", "pred_fusion", "labels", "index")}
    batch_l1 = []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        batch = batch.to(device)
        with autocast(device, bf16):
            out = model(**model_inputs(batch))
        cols["pred"].append(out["pred"].float())
        cols["pred_text"].append(out["pred_text"].float())
        cols["pred_av"].append(out["pred_av"].float())
        cols["pred_fusion"].append(out["pred_fusion"].float().mean(1))
        cols["labels"].append(batch.labels.float())
        cols["index"].append(batch.index)
        batch_l1.append((out["pred"].float() - batch.labels.float()).abs().mean())
    result = {k: torch.cat(v).cpu().numpy() for k, v in cols.items()}
    result["batch_l1"] = torch.stack(batch_l1).cpu().numpy()
    return result


def evaluate(model, loader, dataset: str, device: torch.device, bf16: bool, desc: str = "eval") -> dict[str, float]:
    """MMSA metrics of the multimodal prediction plus `Loss` (mean over batches of each
    batch's L1, the official model-selection value) and the single-head MAEs."""
    p = predict(model, loader, device, bf16, desc)
    if getattr(loader.sampler, "world_size", 1) > 1:  # a rank's shard: metrics need the whole split
        from deepmlf_fast.train.distributed import gather_predictions

        p = gather_predictions(p, loader.batch_size)
    metrics = msa_metrics(p["pred"], p["labels"], dataset)
    metrics["Loss"] = float(p["batch_l1"].mean())
    for head in ("pred_text", "pred_av", "pred_fusion"):
        metrics[f"MAE_{head[5:]}"] = float(np.abs(p[head] - p["labels"]).mean())
    return metrics
