"""Stage 1 of the fusion curriculum: pretrain the AV encoder alone on the labels (`bienc`,
reference §2.8), then hand its weights to DeepMLF.

L1 loss on the last AV step's regression; AdamW; ReduceLROnPlateau on the validation
loss; accumulation and clipping per the parity flags (official: value clip after every
micro-batch, sum accumulation, weight decay 0.01 on everything).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deepmlf_fast.config import RunConfig
from deepmlf_fast.model.av_encoder import AVPretrainModel
from deepmlf_fast.train.checkpoint import load_weights, save_weights
from deepmlf_fast.train.engine import PlainEngine
from deepmlf_fast.train.evaluate import autocast
from deepmlf_fast.train.optim import no_decay_names

log = logging.getLogger(__name__)


def _pretrain_optimizer(model: AVPretrainModel, cfg: RunConfig) -> torch.optim.AdamW:
    flags = cfg.model.flags
    pre = cfg.pretrain
    if flags.weight_decay == "exempt_biases_only":
        # The official stage-1 trainer ignores its configured weight decay: AdamW's default 0.01.
        return torch.optim.AdamW(model.parameters(), lr=pre.lr, betas=tuple(cfg.optim.betas))
    exempt = no_decay_names(model, flags)
    params = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in params if n not in exempt], "weight_decay": pre.weight_decay},
        {"params": [p for n, p in params if n in exempt], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=pre.lr, betas=tuple(cfg.optim.betas))


@torch.no_grad()
def _valid_loss(model, loader, device, bf16) -> float:
    model.eval()
    losses = []
    for batch in loader:
        batch = batch.to(device)
        with autocast(device, bf16):
            pred = model(batch.audio, batch.vision, batch.audio_lengths, batch.vision_lengths)
        losses.append((pred.float() - batch.labels).abs().mean())
    return float(torch.stack(losses).mean())


def pretrain_av(cfg: RunConfig, train_loader, valid_loader, out_path: Path, device: torch.device) -> Path:
    """Train the AV encoder; write its best weights (AVEncoder state dict) to `out_path`."""
    pre = cfg.pretrain
    flags = cfg.model.flags
    bf16 = cfg.train.precision == "bf16"
    model = AVPretrainModel(cfg.model.av, flags.av_pooling, out_len=pre.max_len).to(device)
    optimizer = _pretrain_optimizer(model, cfg)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=pre.plateau_patience)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = PlainEngine(
        params, optimizer, None, accum=pre.grad_accum, clip=pre.grad_clip, flags=flags, clip_every_micro=True,
    )
    best, best_epoch = float("inf"), -1
    for epoch in range(pre.max_epochs):
        start = time.time()
        model.train()
        train_loader.sampler.set_epoch(epoch)
        total, count = torch.zeros((), device=device), 0
        for batch in tqdm(train_loader, desc=f"stage 1 epoch {epoch + 1}", leave=False, dynamic_ncols=True):
            batch = batch.to(device)
            with autocast(device, bf16):
                pred = model(batch.audio, batch.vision, batch.audio_lengths, batch.vision_lengths)
            loss = (pred.float() - batch.labels).abs().mean()
            engine.backward(loss)
            engine.maybe_step()
            total += loss.detach()
            count += 1
        engine.end_epoch()
        valid = _valid_loss(model, valid_loader, device, bf16)
        plateau.step(valid)
        improved = valid < best - 1e-6
        if improved:
            best, best_epoch = valid, epoch
            save_weights(model.encoder.state_dict(), out_path)
        log.info(
            "stage 1 | epoch %d | train L1 %.4f | valid L1 %.4f%s | lr %.2e | %.0fs",
            epoch + 1, float(total) / max(count, 1), valid, " *" if improved else "",
            optimizer.param_groups[0]["lr"], time.time() - start,
        )
        if epoch - best_epoch >= pre.early_stop:
            break
    log.info("stage 1 done: best valid L1 %.4f at epoch %d -> %s", best, best_epoch + 1, out_path)
    return out_path


def load_av_encoder(model, path: Path) -> None:
    """Load stage-1 weights into a DeepMLF model's AV encoder (every key must match)."""
    state = load_weights(path)
    missing, unexpected = model.av_encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"AV encoder checkpoint {path} does not match: missing {missing}, unexpected {unexpected}")
