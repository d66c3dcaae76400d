"""Stage 1 of the fusion curriculum: pretrain the AV encoder alone on the labels (`bienc`,
reference §2.8), then hand its weights to DeepMLF (`DeepMLF.load_av_encoder`).

L1 loss on the last AV step's regression; AdamW; ReduceLROnPlateau on the validation loss;
accumulation and clipping per the parity flags (official: value clip after every
micro-batch, sum accumulation, weight decay 0.01 on everything); early stopping.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deepmlf_fast.config import RunConfig
from deepmlf_fast.model.av_encoder import AVPretrainModel
from deepmlf_fast.model.losses import av_pretrain_loss
from deepmlf_fast.train.checkpoint import save_weights
from deepmlf_fast.train.engine import make_engine
from deepmlf_fast.train.step import StepContext, forward_step

log = logging.getLogger(__name__)


@torch.no_grad()
def _valid_loss(model, loader, ctx: StepContext) -> float:
    model.eval()
    losses = [forward_step(model, batch, ctx).loss for batch in loader]
    return float(torch.stack(losses).mean())


def pretrain_av(cfg: RunConfig, train_loader, valid_loader, out_path: Path, device: torch.device, bf16: bool) -> Path:
    """Train the AV encoder; write its best weights (`AVEncoder` state dict) to `out_path`.
    `bf16`: autocast, as the run's precision decided."""
    pre = cfg.pretrain
    model = AVPretrainModel(cfg.model.av, cfg.model.flags.av_pooling, out_len=pre.max_len).to(device)
    engine = make_engine("av", model, cfg, len(train_loader))
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(engine.optimizer, mode="min", factor=0.1,
                                                         patience=pre.plateau_patience)
    ctx = StepContext(device, bf16, av_pretrain_loss)
    best, best_epoch = float("inf"), -1
    for epoch in range(pre.max_epochs):
        start = time.time()
        model.train()
        train_loader.sampler.set_epoch(epoch)
        total, count = torch.zeros((), device=device), 0
        for batch in tqdm(train_loader, desc=f"stage 1 epoch {epoch + 1}", leave=False, dynamic_ncols=True):
            step = forward_step(model, batch, ctx)
            engine.backward(step.loss)
            engine.maybe_step()
            total += step.loss.detach()
            count += 1
        engine.end_epoch()
        valid = _valid_loss(model, valid_loader, ctx)
        plateau.step(valid)
        improved = valid < best - 1e-6
        if improved:
            best, best_epoch = valid, epoch
            save_weights(model.encoder.state_dict(), out_path)
        log.info(
            "stage 1 | epoch %d | train L1 %.4f | valid L1 %.4f%s | lr %.2e | %.0fs",
            epoch + 1, float(total) / max(count, 1), valid, " *" if improved else "", engine.lr,
            time.time() - start,
        )
        if epoch - best_epoch >= pre.early_stop:
            break
    log.info("stage 1 done: best valid L1 %.4f at epoch %d -> %s", best, best_epoch + 1, out_path)
    return out_path
