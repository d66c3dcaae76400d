"""DeepMLF learns the synthetic task with the real pretrained SmolLM2-135M: the text head
beats chance because the LM understands the sentences, and the fused prediction beats
every single-modality head because the label needs text and audio/vision."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from deepmlf_fast.config import AVPretrainConfig, DataConfig
from deepmlf_fast.presets import recipe
from deepmlf_fast.train.run import train_run


@pytest.mark.slow
def test_fusion_beats_every_single_modality_with_a_real_lm(tmp_path):
    demo = recipe("demo")
    cfg = dataclasses.replace(
        demo,
        data=DataConfig(dataset="mosi", synthetic_sizes=(320, 96, 128), synthetic_seed=1),
        optim=dataclasses.replace(demo.optim, max_epochs=3, cosine_epochs=3, early_stop=3),
        pretrain=AVPretrainConfig(lr=1e-3, max_epochs=4, early_stop=4, grad_accum=1),
        train=dataclasses.replace(demo.train, output_dir=str(tmp_path / "run"), seeds=(11,)),
    )
    results = train_run(cfg)
    run = results["per_seed"]["11"]
    history = json.loads((tmp_path / "run" / "seed_11" / "last" / "state.json").read_text())["history"]
    test = run["test"]
    from deepmlf_fast.train.run import load_run_data

    labels = load_run_data(cfg).test.labels
    chance = float(np.abs(labels - np.median(labels)).mean())  # best constant predictor
    print({k: round(v, 4) for k, v in test.items() if k.startswith("MAE")}, "chance", round(chance, 4),
          [round(h["valid"]["MAE"], 4) for h in history])
    assert test["MAE_text"] < chance - 0.1
    assert test["MAE"] < min(test["MAE_text"], test["MAE_av"], test["MAE_fusion"] + 0.05)
    assert min(h["valid"]["MAE"] for h in history[1:]) < history[0]["valid"]["MAE"]
