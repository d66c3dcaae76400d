"""A model made by `apply_deepmlf` trains through `train_run` (the `deepmlf train` code path: the
loop, the engines, checkpoints), and what the run saves loads back into a freshly applied model."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deepmlf_fast.backbones.load import resolve_backbone
from deepmlf_fast.config import AVPretrainConfig, DataConfig, LossConfig, OptimConfig, RunConfig
from deepmlf_fast.errors import ConfigError
from deepmlf_fast.integrations import apply_deepmlf
from deepmlf_fast.train.checkpoint import load_weights
from deepmlf_fast.train.run import train_run

from helpers import make_batch, tiny_model_config, tiny_run_config


def small_run(out_dir, seeds=(7,), **train) -> RunConfig:
    model = dataclasses.replace(tiny_model_config("tiny-llama", mm_layers=(2, 3)),
                                loss=LossConfig(w_fusion=0.4, w_av=0.8, w_text=0.8, w_clm=0.1))
    return tiny_run_config(
        out_dir, model, data=DataConfig(dataset="mosi", synthetic_sizes=(64, 16, 16)),
        optim=OptimConfig(batch_size=16, grad_accum=1, lr_mm=2e-3, lr_av=2e-3, warmup_epochs=0.0, cosine_epochs=5,
                          max_epochs=3, early_stop=3),
        pretrain=AVPretrainConfig(enabled=False), seeds=seeds, device="cpu", eval_batch_size=32, **train,
    )


def applied(cfg: RunConfig, init_seed: int = 0):
    path = str(resolve_backbone("tiny-llama").path)
    lm, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    return lm, apply_deepmlf(lm, cfg.model, tokenizer=tok, init_seed=init_seed), tok


def test_applied_model_trains_through_train_run_and_its_checkpoint_loads_back(tmp_path):
    cfg = small_run(tmp_path / "run")
    lm, dm, tok = applied(cfg)
    start = {n: p.detach().clone() for n, p in lm.named_parameters()}
    results = train_run(cfg, model=dm, tokenizer=tok)
    history = json.loads((tmp_path / "run" / "seed_7" / "last" / "state.json").read_text())["history"]
    losses = [h["train"]["total"] for h in history]
    assert len(losses) == 3 and losses[-1] < 0.9 * losses[0], losses
    assert results["MAE"] == results["per_seed"]["7"]["test"]["MAE"]
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert recorded["backbone"] == lm.config._name_or_path and recorded["fusion"]["mm_layers"] == [2, 3]
    for name, p in lm.named_parameters():  # the backbone did not move; DeepMLF did
        assert torch.equal(p, start[name]) != name.startswith("deepmlf."), name

    best = load_weights(tmp_path / "run" / "seed_7" / "best.safetensors")
    assert set(best) == set(dm.trained_state_dict())
    _, fresh, _ = applied(cfg, init_seed=1)
    fresh.load_trained_state_dict(best)
    batch = make_batch(tok)
    with torch.no_grad():  # the run ends with its best weights loaded
        torch.testing.assert_close(fresh.eval()(**batch)["pred"], dm.eval()(**batch)["pred"], atol=0, rtol=0)


def test_a_given_model_needs_its_tokenizer_and_one_seed(tmp_path):
    cfg = small_run(tmp_path / "run", seeds=(1, 2))
    _, dm, tok = applied(cfg)
    with pytest.raises(ConfigError, match=r"train.seeds: .* expected one seed, found \[1, 2\]"):
        train_run(cfg, model=dm, tokenizer=tok)
    with pytest.raises(ConfigError, match="tokenizer"):
        train_run(small_run(tmp_path / "run"), model=dm)
    assert not (tmp_path / "run").exists()


def _deepspeed_rank(out_dir: Path, ds_config: Path) -> None:
    """One gloo rank: apply DeepMLF to a freshly loaded LM and train it under DeepSpeed."""
    cfg = small_run(out_dir, deepspeed=str(ds_config))
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_epochs=2))
    lm, dm, tok = applied(cfg)
    train_run(cfg, model=dm, tokenizer=tok)
    assert "deepmlf" in dict(lm.named_children())  # DeepSpeed trained the attached model itself


@pytest.mark.distributed
def test_applied_model_trains_under_deepspeed_zero3(tmp_path):
    pytest.importorskip("deepspeed")
    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))  # tests/train/ds_worker: gloo ranks
    from ds_worker import deepspeed_config, launch

    launch(_deepspeed_rank, tmp_path / "run", deepspeed_config(tmp_path, "zero3.json"), world=1)
    history = json.loads((tmp_path / "run" / "seed_7" / "last" / "state.json").read_text())["history"]
    assert len(history) == 2 and history[1]["train"]["total"] < history[0]["train"]["total"]
    assert (tmp_path / "run" / "seed_7" / "deepspeed" / "step8").is_dir()  # DeepSpeed's own checkpoints
    assert set(load_weights(tmp_path / "run" / "seed_7" / "best.safetensors")) >= {"fusion_tokens.weight"}
