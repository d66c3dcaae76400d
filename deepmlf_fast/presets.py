"""Named recipes as flat tables of dotted overrides on `RunConfig()`'s defaults, and the rule
that adapts a recipe to another backbone.

* `mosei-gpt2`, `mosei-gpt2-large`, `sims-gpt2-chinese`, `mosi-smollm2-1.7b`: the released
  `best` configs, field for field (reference §1.2, §2.8; the broken ULGM switch of the MOSI
  config is dropped).
* `demo`: MOSI-shaped synthetic data with SmolLM2-135M (the MOSI recipe adapted to it, no LoRA),
  sized to train end to end on 2 CPU cores in minutes.
* `--dataset X` alone picks that dataset's released recipe; `--backbone Y` on top keeps the
  recipe and adapts it to Y (`adapt_to_backbone`).

No recipe sets the AV input widths: they are the data's (`config.with_av_widths`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from deepmlf_fast.config import RunConfig, apply_overrides
from deepmlf_fast.data.specs import dataset_spec
from deepmlf_fast.errors import ConfigError

MOSEI_GPT2: dict[str, Any] = {
    "model.backbone": "gpt2",
    "model.av.max_len": 50, "model.av.p_perm": 0.2,
    "model.fusion.n_tokens": 12, "model.fusion.mm_layers": (3, 5, 7, 8, 9, 10, 11),
    "model.text.max_tokens": 50, "model.text.seqaug": True, "model.text.p_perm": 0.2, "model.text.p_apply": 0.30,
    "model.loss.w_fusion": 1.0, "model.loss.w_av": 1.0, "model.loss.w_text": 1.0, "model.loss.w_clm": 1.1,
    "data.dataset": "mosei",
    "optim.weight_decay_mm": 0.005, "optim.weight_decay_av": 0.005, "optim.cosine_epochs": 15,
    "optim.early_stop": 10, "optim.key_metric": "Loss",
    "pretrain.lr": 5e-3, "pretrain.plateau_patience": 4,
}

MOSEI_GPT2_LARGE: dict[str, Any] = {
    **MOSEI_GPT2,
    "model.backbone": "gpt2-large",
    "model.fusion.mm_layers": (7, 14, 21, 28, 35),
    "model.text.p_perm": 0.3, "model.text.p_apply": 0.25,
    "model.loss.w_clm": 1.0,
    "optim.weight_decay_mm": 0.1, "optim.weight_decay_av": 0.1, "optim.cosine_epochs": 20,
}

SIMS_GPT2_CHINESE: dict[str, Any] = {
    "model.backbone": "gpt2-chinese",
    "model.av.max_len": 55, "model.av.p_perm": 0.2,
    "model.av.batch_norm_audio": True, "model.av.batch_norm_vision": True,
    "model.fusion.n_tokens": 20, "model.fusion.mm_layers": (5, 6, 7, 8, 9, 10, 11),
    "model.text.max_tokens": 39, "model.text.seqaug": True, "model.text.p_perm": 0.30, "model.text.p_apply": 0.25,
    "model.loss.w_clm": 1.0,
    "data.dataset": "sims",
    "optim.weight_decay_mm": 0.1, "optim.weight_decay_av": 0.1, "optim.cosine_epochs": 100,
    "optim.early_stop": 10, "optim.key_metric": "Loss",
    "pretrain.lr": 5e-4, "pretrain.plateau_patience": 10, "pretrain.max_len": 39,
}

MOSI_SMOLLM2: dict[str, Any] = {
    "model.backbone": "smollm2-1.7b",
    "model.av.max_len": 50, "model.av.p_perm": 0.3,
    "model.fusion.n_tokens": 8, "model.fusion.mm_layers": (11, 14, 17, 20, 23),
    "model.fusion.lora_rank": 512, "model.fusion.lora_alpha": 8192.0, "model.fusion.lora_dropout": 0.05,
    "model.text.max_tokens": 50, "model.text.seqaug": False,
    "model.loss.w_fusion": 0.4, "model.loss.w_av": 0.8, "model.loss.w_text": 0.8, "model.loss.w_clm": 0.0,
    "data.dataset": "mosi",
    "optim.weight_decay_mm": 0.001, "optim.weight_decay_av": 0.001, "optim.cosine_epochs": 150,
    "optim.early_stop": 30, "optim.key_metric": "MAE",
    "pretrain.lr": 1e-3, "pretrain.plateau_patience": 10,
    "train.recipe_precision": "bf16",
}

DEMO: dict[str, Any] = {
    **MOSI_SMOLLM2,
    # The MOSI recipe on SmolLM2-135M, as `adapt_to_backbone` places it (30 blocks, width 576).
    "model.backbone": "smollm2-135m",
    "model.fusion.mm_layers": (14, 18, 21, 25, 29),
    "model.fusion.lora_rank": 0,
    # What 226 CPU steps need for the fusion tokens to learn (the README's Presets section has the
    # measurements): Flamingo-style tanh gates, the MM FFNs closed at start so the frozen LM's text
    # stream is intact, the cross-attention half open so the fusion tokens read A from the start;
    # the fusion-token loss at full weight and a faster MM side. The steps go to 1,800 distinct
    # samples seen twice, not 400 seen many times: on 400 every head fits the training set, and
    # the fusion head's margin over the text head fell to 0.0-0.1 MAE on some seeds and CPUs.
    "model.fusion.gate": "tanh", "model.fusion.gate_init": 0.5, "model.fusion.ffn_gate_init": 0.0,
    "model.loss.w_fusion": 1.0,
    "data.synthetic_sizes": (1800, 100, 200),
    "optim.batch_size": 16, "optim.grad_accum": 1, "optim.lr_mm": 2e-3, "optim.lr_av": 3e-4,
    "optim.warmup_epochs": 0.2, "optim.cosine_epochs": 2, "optim.max_epochs": 2, "optim.early_stop": 2,
    "pretrain.max_epochs": 6, "pretrain.early_stop": 3, "pretrain.grad_accum": 1,
    "train.output_dir": "runs/demo",
}

RECIPES: dict[str, dict[str, Any]] = {
    "mosei-gpt2": MOSEI_GPT2,
    "mosei-gpt2-large": MOSEI_GPT2_LARGE,
    "sims-gpt2-chinese": SIMS_GPT2_CHINESE,
    "mosi-smollm2-1.7b": MOSI_SMOLLM2,
    "demo": DEMO,
}

DATASET_RECIPE: dict[str, str] = {table["data.dataset"]: name for name, table in reversed(RECIPES.items())}
"""A dataset's released recipe: the first of `RECIPES` that trains on it."""


def recipe(name: str) -> RunConfig:
    """A fresh `RunConfig` of a named recipe."""
    if name not in RECIPES:
        raise ConfigError(f"preset: expected one of {sorted(RECIPES)}, found {name!r}")
    return apply_overrides(RunConfig(), RECIPES[name])


def recipe_for_dataset(dataset: str) -> RunConfig:
    """The released recipe of a dataset (a key of `data.specs.DATASETS`)."""
    name = dataset_spec(dataset).name
    if name not in DATASET_RECIPE:
        raise ConfigError(f"data.dataset: expected one with a released recipe ({sorted(DATASET_RECIPE)}) or a --preset, "
                          f"found {name!r}")
    return recipe(DATASET_RECIPE[name])


def scale_mm_layers(layers: tuple[int, ...], from_layers: int, to_layers: int) -> tuple[int, ...]:
    """Move MM-block positions to a backbone of another depth, keeping their relative depth
    (the last block stays after the last LM block)."""
    if from_layers == to_layers:
        return tuple(layers)
    scaled = {round(i * (to_layers - 1) / max(from_layers - 1, 1)) for i in layers}
    return tuple(sorted(scaled))


def adapt_to_backbone(cfg: RunConfig, backbone: str) -> RunConfig:
    """Keep a recipe but run it on another backbone.

    MM-block positions are rescaled from the recipe backbone's depth to the new one; the MM
    head count becomes the backbone preset's (16 unless stated) and is lowered until it
    divides the width with a head dimension of at least 16; a LoRA rank is capped at a
    quarter of the width. Reads the backbones' configs, never their weights.
    """
    from deepmlf_fast.backbones.load import backbone_config
    from deepmlf_fast.backbones.registry import BACKBONES

    new = backbone_config(backbone)
    n_layers, width = new.num_hidden_layers, new.hidden_size
    fusion = cfg.model.fusion
    layers = fusion.mm_layers
    if cfg.model.backbone in BACKBONES and layers:
        layers = scale_mm_layers(layers, backbone_config(cfg.model.backbone).num_hidden_layers, n_layers)
    heads = BACKBONES[backbone].mm_heads if backbone in BACKBONES else 16
    while heads > 1 and (width % heads or width // heads < 16):
        heads -= 1
    fusion = dataclasses.replace(
        fusion, mm_layers=layers, n_heads=heads,
        lora_rank=min(fusion.lora_rank, width // 4) if fusion.lora_rank else 0,
    )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=backbone, fusion=fusion))
