"""Stage 1 of the fusion curriculum: pretrain the AV encoder alone on the labels (`bienc`,
reference §2.8), then hand its weights to DeepMLF (`DeepMLF.load_av_encoder`).

L1 loss on the last AV step's regression; AdamW; ReduceLROnPlateau on the validation loss;
accumulation and clipping per the parity flags (official: value clip after every
micro-batch, sum accumulation, weight decay 0.01 on everything); early stopping. The loop,
its resume points and best checkpoints are stage 2's (`loop.fit`, files from
`RunDir.stage1`); the finished encoder is written to `out_path` last, so its presence means
stage 1 is complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import torch

from deepmlf_fast.config import RunConfig
from deepmlf_fast.model.av_encoder import AVPretrainModel
from deepmlf_fast.model.losses import av_pretrain_loss
from deepmlf_fast.train.checkpoint import save_weights
from deepmlf_fast.train.engine import PlainEngine, make_engine
from deepmlf_fast.train.loop import OnBatch, fit
from deepmlf_fast.train.rundir import StageFiles
from deepmlf_fast.train.step import StepContext, forward_step

log = logging.getLogger(__name__)


@torch.no_grad()
def _valid_loss(model, loader, ctx: StepContext) -> float:
    model.eval()
    losses = [forward_step(model, batch, ctx).loss for batch in loader]
    return float(torch.stack(losses).mean())


@dataclass
class AVPretrainStage:
    """Stage 1 for `loop.fit`: the AV pretraining model on its L1 loss, validated on the mean
    L1 over the validation batches (key `L1`), which also steps the ReduceLROnPlateau."""

    number: ClassVar[int] = 1
    shared: ClassVar[bool] = False
    key: ClassVar[str] = "L1"
    model: AVPretrainModel
    engine: PlainEngine
    loader: torch.utils.data.DataLoader
    valid_loader: torch.utils.data.DataLoader
    cfg: RunConfig
    ctx: StepContext
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau = field(init=False)
    max_epochs: int = field(init=False)
    early_stop: int = field(init=False)
    log_every: int = field(init=False)

    def __post_init__(self):
        pre = self.cfg.pretrain
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(self.engine.optimizer, mode="min", factor=0.1,
                                                                  patience=pre.plateau_patience)
        self.max_epochs, self.early_stop, self.log_every = pre.max_epochs, pre.early_stop, self.cfg.train.log_every

    def validate(self) -> dict[str, float]:
        value = _valid_loss(self.model, self.valid_loader, self.ctx)
        self.plateau.step(value)
        return {self.key: value}

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights)

    def state_dict(self) -> dict:
        return {"engine": self.engine.state_dict(), "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state["engine"])
        self.plateau.load_state_dict(state["plateau"])

    def summary(self, weights: dict[str, torch.Tensor]) -> dict:
        return {}


def pretrain_av(cfg: RunConfig, train_loader, valid_loader, files: StageFiles, out_path: Path,
                device: torch.device, bf16: bool, on_batch: Sequence[OnBatch] = ()) -> Path:
    """Train the AV encoder (resuming from `files` when a resume point is there); write its
    best weights (`AVEncoder` state dict) to `out_path` when done. `bf16`: autocast, as the
    run's precision decided. In a distributed run only rank 0 calls it."""
    model = AVPretrainModel(cfg.model.av, cfg.model.flags.av_pooling, out_len=cfg.pretrain.max_len).to(device)
    engine = make_engine("av", model, cfg, len(train_loader))
    ctx = StepContext(device, bf16, av_pretrain_loss)
    fit(AVPretrainStage(model, engine, train_loader, valid_loader, cfg, ctx), files, on_batch=on_batch)
    save_weights(model.encoder.state_dict(), out_path)
    log.info("stage 1 done: AV encoder -> %s", out_path)
    return out_path
