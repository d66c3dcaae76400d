"""The released recipes, field for field (reference §1.2, §2.8), and backbone adaptation."""

from __future__ import annotations

import pytest

from deepmlf_fast.config import with_av_widths
from deepmlf_fast.errors import ConfigError
from deepmlf_fast.presets import RECIPES, adapt_to_backbone, recipe, recipe_for_dataset, scale_mm_layers


@pytest.mark.parametrize(
    "name, backbone, tokens, layers, losses, clm, wd, cosine, stop, key, seqaug",
    [
        ("mosei-gpt2", "gpt2", 12, (3, 5, 7, 8, 9, 10, 11), (1, 1, 1), 1.1, 0.005, 15, 10, "Loss", (0.2, 0.30)),
        ("mosei-gpt2-large", "gpt2-large", 12, (7, 14, 21, 28, 35), (1, 1, 1), 1.0, 0.1, 20, 10, "Loss", (0.3, 0.25)),
        ("sims-gpt2-chinese", "gpt2-chinese", 20, (5, 6, 7, 8, 9, 10, 11), (1, 1, 1), 1.0, 0.1, 100, 10, "Loss",
         (0.30, 0.25)),
        ("mosi-smollm2-1.7b", "smollm2-1.7b", 8, (11, 14, 17, 20, 23), (0.4, 0.8, 0.8), 0.0, 0.001, 150, 30, "MAE",
         None),
    ],
)
def test_released_recipes(name, backbone, tokens, layers, losses, clm, wd, cosine, stop, key, seqaug):
    cfg = recipe(name)
    m, o = cfg.model, cfg.optim
    assert m.backbone == backbone and m.fusion.n_tokens == tokens and m.fusion.mm_layers == layers
    assert (m.loss.w_fusion, m.loss.w_av, m.loss.w_text) == losses and m.loss.w_clm == clm
    assert o.lr_mm == o.lr_av == 1e-4 and o.weight_decay_mm == o.weight_decay_av == wd
    assert o.betas == (0.9, 0.95) and o.batch_size == 32 and o.grad_accum == 8 and o.grad_clip == 5.0
    assert o.warmup_epochs == 1 and o.cosine_epochs == cosine and o.early_stop == stop and o.key_metric == key
    assert m.fusion.n_heads == 16 and m.fusion.gate == "sigmoid" and m.fusion.gate_init == 0 and m.fusion.ffn_all_rows
    assert (m.text.seqaug and (m.text.p_perm, m.text.p_apply) == seqaug) or (not m.text.seqaug and seqaug is None)


def test_sims_and_mosi_specifics():
    sims, mosi = recipe("sims-gpt2-chinese"), recipe("mosi-smollm2-1.7b")
    assert sims.model.av.max_len == 55 and sims.model.av.batch_norm_audio and sims.model.av.batch_norm_vision
    assert sims.pretrain.max_len == 39 and sims.model.text.max_tokens == 39
    assert mosi.model.fusion.lora_rank == 512 and mosi.model.fusion.lora_alpha == 8192
    assert mosi.model.av.p_perm == 0.3 and mosi.train.recipe_precision == "bf16"
    assert {recipe(n).train.recipe_precision for n in ("mosei-gpt2", "mosei-gpt2-large", "sims-gpt2-chinese")} == {"fp32"}
    assert all(recipe(n).train.precision == "auto" for n in ("mosi-smollm2-1.7b", "demo", "mosei-gpt2"))
    assert [recipe_for_dataset(d).model.backbone for d in ("mosi", "mosei", "sims")] == [
        "smollm2-1.7b", "gpt2", "gpt2-chinese"]


def test_mm_layers_rescale_keeping_the_last_block():
    assert scale_mm_layers((11, 14, 17, 20, 23), 24, 30) == (14, 18, 21, 25, 29)
    assert scale_mm_layers((3, 5, 7, 8, 9, 10, 11), 12, 4) == (1, 2, 3)
    assert scale_mm_layers((1, 2), 12, 12) == (1, 2)


def test_adapting_to_a_tiny_backbone():
    cfg = adapt_to_backbone(recipe("mosi-smollm2-1.7b"), "tiny-llama")
    f = cfg.model.fusion
    assert cfg.model.backbone == "tiny-llama" and f.mm_layers[-1] == 3 and f.n_heads == 8
    assert f.lora_rank == 32  # capped at a quarter of the width


def test_demo_is_the_mosi_recipe_adapted_to_smollm2_135m():
    adapted = adapt_to_backbone(recipe("mosi-smollm2-1.7b"), "smollm2-135m").model.fusion
    demo = recipe("demo").model.fusion
    assert (demo.mm_layers, demo.n_heads) == (adapted.mm_layers, adapted.n_heads) and demo.lora_rank == 0


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="preset: expected one of"):
        recipe("mosi-gpt5")


def test_the_av_widths_are_the_datas():
    """No recipe states the AV input widths: they come from the data (`with_av_widths`; without
    data, the widths the dataset's files have), and a width a config gives must match them."""
    assert all(recipe(n).model.av.audio_dim is None and recipe(n).model.av.vision_dim is None for n in RECIPES)
    av = with_av_widths(recipe("sims-gpt2-chinese")).model.av
    assert (av.audio_dim, av.vision_dim) == (33, 709)
    av = with_av_widths(recipe("mosei-gpt2"), (80, 35)).model.av  # a file with other audio features
    assert (av.audio_dim, av.vision_dim) == (80, 35)
    with pytest.raises(ConfigError, match=r"^model\.av\.audio_dim: expected the data's width 80, found 74$"):
        with_av_widths(with_av_widths(recipe("mosei-gpt2")), (80, 35))

