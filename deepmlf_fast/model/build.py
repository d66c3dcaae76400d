"""Build a DeepMLF model from a `ModelConfig`: load the frozen backbone, wrap it."""

from __future__ import annotations

import torch

from deepmlf_fast.backbones.load import load_backbone
from deepmlf_fast.config import ModelConfig
from deepmlf_fast.model.deepmlf import DeepMLF

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(cfg: ModelConfig, device: str | torch.device | None = None, init_seed: int = 0):
    """-> `(DeepMLF, tokenizer)`. The new modules' random init depends only on `init_seed`,
    so a model rebuilt from a checkpoint's config reproduces every untrained tensor."""
    lm, tokenizer, spec = load_backbone(
        cfg.backbone, dtype=DTYPES[cfg.backbone_dtype], load_in_8bit=cfg.load_in_8bit,
        load_in_4bit=cfg.load_in_4bit, random_init=cfg.random_init, device=device,
    )
    return DeepMLF(cfg, lm, spec, tokenizer.pad_token_id, init_seed=init_seed), tokenizer
