"""Test helpers shared across folders (importable as `helpers`: pyproject puts tests/ on the path)."""

from __future__ import annotations

import functools

import torch

from deepmlf_fast.config import (
    AVEncoderConfig,
    AVPretrainConfig,
    DataConfig,
    FusionConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
)


@functools.lru_cache(maxsize=None)
def load_tiny(name: str):
    """The `LoadedBackbone` of a tiny preset, loaded once per test session."""
    from deepmlf_fast.backbones.load import load_backbone

    return load_backbone(name)


def tiny_model_config(backbone: str = "tiny-gpt2", **fusion) -> ModelConfig:
    """A small DeepMLF config: 4-layer backbone, 4 fusion tokens, MM blocks after blocks 1 and 3."""
    f = dict(n_tokens=4, mm_layers=(1, 3), n_heads=8, dropout=0.1)
    f.update(fusion)
    return ModelConfig(
        backbone=backbone,
        av=AVEncoderConfig(audio_dim=5, vision_dim=20, max_len=12),
        fusion=FusionConfig(**f),
        text=TextConfig(max_tokens=16),
        loss=LossConfig(w_clm=1.0),
    )


def tiny_run_config(out_dir, model: ModelConfig | None = None, *, data: DataConfig | None = None,
                    optim: OptimConfig | None = None, pretrain: AVPretrainConfig | None = None,
                    **train) -> RunConfig:
    """A run of `model` (default `tiny_model_config("tiny-llama")`) on MOSI data into `out_dir`,
    seed 7; `data`, `optim`, `pretrain` replace those sections, `train` sets `TrainConfig` fields."""
    return RunConfig(model=model or tiny_model_config("tiny-llama"), data=data or DataConfig(dataset="mosi"),
                     optim=optim or OptimConfig(), pretrain=pretrain or AVPretrainConfig(),
                     train=TrainConfig(**{"output_dir": str(out_dir), "seeds": (7,), **train}))


def make_model(backbone: str = "tiny-gpt2", parity: str = "corrected", seed: int = 0, **fusion):
    from deepmlf_fast.model.deepmlf import DeepMLF

    bb = load_tiny(backbone)
    cfg = tiny_model_config(backbone, **fusion)
    cfg.parity = parity
    return DeepMLF(cfg, bb.lm, bb.spec, bb.pad_id, init_seed=seed), bb.tokenizer


TEXTS = ["a gripping, beautifully acted film", "dull", "not the worst movie this year , but close to it"]


def make_batch(tok, texts=TEXTS, ta: int = 37, tv: int = 29, seed: int = 0, max_tokens: int = 16,
               n_fusion: int = 4) -> dict:
    """Packed model inputs for `texts` (`DeepMLF.forward`'s keywords): real token ids, their
    layout with `n_fusion` fusion tokens at position `max_tokens`, random audio/vision."""
    from deepmlf_fast.data.packing import pack_padded

    enc = tok(list(texts), truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
    text_ids, layout = pack_padded(enc["input_ids"], enc["attention_mask"].sum(1), n_fusion, max_tokens)
    g = torch.Generator().manual_seed(seed)
    b = len(texts)
    return dict(
        text_ids=text_ids,
        layout=layout,
        audio=torch.randn(b, ta, 5, generator=g),
        vision=torch.randn(b, tv, 20, generator=g),
    )


def to_device(batch: dict, device) -> dict:
    """A `make_batch` dict with every tensor (and the layout) on `device`."""
    return {k: v.to(device) for k, v in batch.items()}
