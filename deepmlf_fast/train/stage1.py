"""Stage 1 of the fusion curriculum: pretrain the AV encoder alone on the labels (`bienc`,
reference §2.8), then hand its weights to DeepMLF (`DeepMLF.load_av_encoder`).

L1 loss on the last AV step's regression; AdamW; ReduceLROnPlateau on the validation loss;
accumulation and clipping per the parity flags (official: value clip after every
micro-batch, sum accumulation, weight decay 0.01 on everything); early stopping.

Resumable like stage 2: every epoch ends with a resume point in `work_dir/last/` (weights,
optimizer, plateau scheduler, RNG) and the best weights in `work_dir/best.safetensors`; the
finished encoder is written to `out_path` last, so its presence means stage 1 is complete.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deepmlf_fast.config import RunConfig
from deepmlf_fast.fileio import pause_point
from deepmlf_fast.model.av_encoder import AVPretrainModel
from deepmlf_fast.model.losses import av_pretrain_loss
from deepmlf_fast.train.checkpoint import (
    Stage1State,
    is_new_best,
    load_resume,
    load_weights,
    open_resume_point,
    save_resume,
    save_weights,
    set_rng_state,
)
from deepmlf_fast.train.engine import make_engine
from deepmlf_fast.train.step import StepContext, forward_step

log = logging.getLogger(__name__)


@torch.no_grad()
def _valid_loss(model, loader, ctx: StepContext) -> float:
    model.eval()
    losses = [forward_step(model, batch, ctx).loss for batch in loader]
    return float(torch.stack(losses).mean())


def pretrain_av(cfg: RunConfig, train_loader, valid_loader, out_path: Path, work_dir: Path, device: torch.device,
                bf16: bool) -> Path:
    """Train the AV encoder (resuming from `work_dir` when a resume point is there); write its
    best weights (`AVEncoder` state dict) to `out_path` when done. `bf16`: autocast, as the
    run's precision decided."""
    pre = cfg.pretrain
    model = AVPretrainModel(cfg.model.av, cfg.model.flags.av_pooling, out_len=pre.max_len).to(device)
    engine = make_engine("av", model, cfg, len(train_loader))
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(engine.optimizer, mode="min", factor=0.1,
                                                         patience=pre.plateau_patience)
    ctx = StepContext(device, bf16, av_pretrain_loss)
    last, best_path = work_dir / "last", work_dir / "best.safetensors"
    state = Stage1State()
    exists, repaired = open_resume_point(last)
    if repaired:
        log.warning("stage-1 resume point %s: %s", last, repaired)
    if exists:
        weights, engine_state, rng, state = load_resume(last, Stage1State)
        model.load_state_dict(weights)
        engine.load_state_dict(engine_state["engine"])
        plateau.load_state_dict(engine_state["plateau"])
        set_rng_state(rng)
        log.info("resuming stage 1 from %s after epoch %d (best valid L1 %.4f at epoch %d)", last, state.epoch,
                 state.best, state.best_epoch + 1)
    while state.epoch < pre.max_epochs and not (state.epoch > 0 and state.epoch - 1 - state.best_epoch >= pre.early_stop):
        epoch, start = state.epoch, time.time()
        model.train()
        train_loader.sampler.set_epoch(epoch)
        total, count = torch.zeros((), device=device), 0
        for batch in tqdm(train_loader, desc=f"stage 1 epoch {epoch + 1}", leave=False, dynamic_ncols=True):
            step = forward_step(model, batch, ctx)
            engine.backward(step.loss, step.parts)
            engine.maybe_step()
            total += step.loss.detach()
            count += 1
            pause_point(f"stage1-epoch{epoch + 1}-batch{count}")
        engine.end_epoch()
        valid = _valid_loss(model, valid_loader, ctx)
        plateau.step(valid)
        improved = is_new_best(valid, state.best, state.best_epoch >= 0)
        if not math.isfinite(valid):
            log.warning("stage 1 epoch %d: valid L1 is %s, which never counts as an improvement", epoch + 1, valid)
        if improved:
            state.best, state.best_epoch = valid if math.isfinite(valid) else float("inf"), epoch
            save_weights(model.encoder.state_dict(), best_path)
        state.epoch += 1
        save_resume(last, model.state_dict(), {"engine": engine.state_dict(), "plateau": plateau.state_dict()}, state)
        log.info(
            "stage 1 | epoch %d | train L1 %.4f | valid L1 %.4f%s | lr %.2e | %.0fs",
            epoch + 1, float(total) / max(count, 1), valid, " *" if improved else "", engine.lr,
            time.time() - start,
        )
    save_weights(load_weights(best_path), out_path)
    log.info("stage 1 done: best valid L1 %.4f at epoch %d -> %s", state.best, state.best_epoch + 1, out_path)
    return out_path
