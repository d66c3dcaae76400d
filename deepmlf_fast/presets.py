"""Named recipes: the four released DeepMLF configurations (reference §1.2, §2.8) and the
embedded CPU demo, plus the rule that adapts a recipe to another backbone.

* `mosei-gpt2`, `mosei-gpt2-large`, `sims-gpt2-chinese`, `mosi-smollm2-1.7b`: the released
  `best` configs, field for field (the broken ULGM switch of the MOSI config is dropped).
* `demo`: MOSI-shaped synthetic data with SmolLM2-135M, sized to train end to end on
  2 CPU cores in minutes.
* `--dataset X` alone picks that dataset's released recipe; `--backbone Y` on top keeps
  the recipe and adapts it to Y (`adapt_to_backbone`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from deepmlf_fast.backbones.registry import BACKBONES
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
from deepmlf_fast.data.specs import dataset_spec
from deepmlf_fast.errors import ConfigError


def _mosei_gpt2() -> RunConfig:
    return RunConfig(
        model=ModelConfig(
            backbone="gpt2",
            av=AVEncoderConfig(audio_dim=74, vision_dim=35, max_len=50, p_perm=0.2),
            fusion=FusionConfig(n_tokens=12, mm_layers=(3, 5, 7, 8, 9, 10, 11)),
            text=TextConfig(max_tokens=50, seqaug=True, p_perm=0.2, p_apply=0.30),
            loss=LossConfig(w_fusion=1.0, w_av=1.0, w_text=1.0, w_clm=1.1),
        ),
        data=DataConfig(dataset="mosei"),
        optim=OptimConfig(
            weight_decay_mm=0.005, weight_decay_av=0.005, cosine_epochs=15, early_stop=10, key_metric="Loss",
        ),
        pretrain=AVPretrainConfig(lr=5e-3, plateau_patience=4),
    )


def _mosei_gpt2_large() -> RunConfig:
    cfg = _mosei_gpt2()
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model,
            backbone="gpt2-large",
            fusion=FusionConfig(n_tokens=12, mm_layers=(7, 14, 21, 28, 35)),
            text=TextConfig(max_tokens=50, seqaug=True, p_perm=0.3, p_apply=0.25),
            loss=LossConfig(w_clm=1.0),
        ),
        optim=dataclasses.replace(cfg.optim, weight_decay_mm=0.1, weight_decay_av=0.1, cosine_epochs=20),
    )


def _sims_gpt2_chinese() -> RunConfig:
    return RunConfig(
        model=ModelConfig(
            backbone="gpt2-chinese",
            av=AVEncoderConfig(
                audio_dim=33, vision_dim=709, max_len=55, p_perm=0.2, batch_norm_audio=True, batch_norm_vision=True,
            ),
            fusion=FusionConfig(n_tokens=20, mm_layers=(5, 6, 7, 8, 9, 10, 11)),
            text=TextConfig(max_tokens=39, seqaug=True, p_perm=0.30, p_apply=0.25),
            loss=LossConfig(w_clm=1.0),
        ),
        data=DataConfig(dataset="sims"),
        optim=OptimConfig(
            weight_decay_mm=0.1, weight_decay_av=0.1, cosine_epochs=100, early_stop=10, key_metric="Loss",
        ),
        pretrain=AVPretrainConfig(lr=5e-4, plateau_patience=10, max_len=39),
    )


def _mosi_smollm2() -> RunConfig:
    return RunConfig(
        model=ModelConfig(
            backbone="smollm2-1.7b",
            av=AVEncoderConfig(audio_dim=5, vision_dim=20, max_len=50, p_perm=0.3),
            fusion=FusionConfig(
                n_tokens=8, mm_layers=(11, 14, 17, 20, 23), lora_rank=512, lora_alpha=8192.0, lora_dropout=0.05,
            ),
            text=TextConfig(max_tokens=50, seqaug=False),
            loss=LossConfig(w_fusion=0.4, w_av=0.8, w_text=0.8, w_clm=0.0),
            backbone_dtype="bfloat16",
        ),
        data=DataConfig(dataset="mosi"),
        optim=OptimConfig(
            weight_decay_mm=0.001, weight_decay_av=0.001, cosine_epochs=150, early_stop=30, key_metric="MAE",
        ),
        pretrain=AVPretrainConfig(lr=1e-3, plateau_patience=10),
        train=TrainConfig(precision="bf16"),
    )


def _demo() -> RunConfig:
    """Embedded default: synthetic MOSI-shaped data and SmolLM2-135M on CPU."""
    cfg = adapt_to_backbone(_mosi_smollm2(), "smollm2-135m", n_layers=30, hidden_size=576)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model,
            fusion=dataclasses.replace(cfg.model.fusion, lora_rank=0),
            backbone_dtype="bfloat16",
        ),
        optim=dataclasses.replace(
            cfg.optim, batch_size=16, grad_accum=1, lr_mm=3e-4, lr_av=3e-4, warmup_epochs=0.5,
            cosine_epochs=4, max_epochs=4, early_stop=4,
        ),
        pretrain=dataclasses.replace(cfg.pretrain, max_epochs=6, early_stop=3, grad_accum=1),
        train=dataclasses.replace(cfg.train, precision="bf16", output_dir="runs/demo"),
    )


RECIPES: dict[str, Callable[[], RunConfig]] = {
    "mosei-gpt2": _mosei_gpt2,
    "mosei-gpt2-large": _mosei_gpt2_large,
    "sims-gpt2-chinese": _sims_gpt2_chinese,
    "mosi-smollm2-1.7b": _mosi_smollm2,
    "demo": _demo,
}

DATASET_RECIPE = {"mosi": "mosi-smollm2-1.7b", "mosei": "mosei-gpt2", "sims": "sims-gpt2-chinese"}


def recipe(name: str) -> RunConfig:
    """A fresh copy of a named recipe."""
    try:
        return RECIPES[name]()
    except KeyError:
        raise ConfigError(f"preset: expected one of {sorted(RECIPES)}, found {name!r}") from None


def recipe_for_dataset(dataset: str) -> RunConfig:
    """The released recipe of a dataset ('mosi', 'mosei', 'sims')."""
    return recipe(DATASET_RECIPE[dataset_spec(dataset).name])


def scale_mm_layers(layers: tuple[int, ...], from_layers: int, to_layers: int) -> tuple[int, ...]:
    """Move MM-block positions to a backbone of another depth, keeping their relative depth
    (the last block stays after the last LM block)."""
    if from_layers == to_layers:
        return tuple(layers)
    scaled = {round(i * (to_layers - 1) / max(from_layers - 1, 1)) for i in layers}
    return tuple(sorted(scaled))


def adapt_to_backbone(cfg: RunConfig, backbone: str, n_layers: int, hidden_size: int) -> RunConfig:
    """Keep a recipe but run it on another backbone.

    MM-block positions are rescaled to the new depth; the MM head count becomes the
    backbone preset's (16 unless stated) and is lowered until it divides the width with a
    head dimension of at least 16; a LoRA rank is capped at a quarter of the width.
    """
    old = cfg.model.backbone
    recipe_depth = _preset_depth(old)
    fusion = cfg.model.fusion
    layers = fusion.mm_layers
    if recipe_depth is not None and layers:
        layers = scale_mm_layers(layers, recipe_depth, n_layers)
    heads = BACKBONES[backbone].mm_heads if backbone in BACKBONES else 16
    while heads > 1 and (hidden_size % heads or hidden_size // heads < 16):
        heads -= 1
    fusion = dataclasses.replace(
        fusion, mm_layers=layers, n_heads=heads,
        lora_rank=min(fusion.lora_rank, hidden_size // 4) if fusion.lora_rank else 0,
    )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=backbone, fusion=fusion))


def _preset_depth(backbone: str) -> int | None:
    preset = BACKBONES.get(backbone)
    if preset is None:
        return None
    return preset.config.get("n_layer") or preset.config.get("num_hidden_layers")


def resolve_backbone_dims(backbone: str) -> tuple[int, int]:
    """(number of LM blocks, hidden width) of a backbone preset or local checkpoint, without
    loading weights."""
    preset = BACKBONES.get(backbone)
    if preset is not None:
        c = preset.config
        return c.get("n_layer") or c["num_hidden_layers"], c.get("n_embd") or c["hidden_size"]
    from deepmlf_fast.backbones.load import resolve_backbone

    resolved = resolve_backbone(backbone)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolved.path, local_files_only=True)
    return config.num_hidden_layers, config.hidden_size
