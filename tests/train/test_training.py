"""End-to-end training on the synthetic data: learning, resume, results contract."""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
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
)
from deepmlf_fast.metrics import METRIC_KEYS
from deepmlf_fast.train import loop
from deepmlf_fast.train.checkpoint import load_weights
from deepmlf_fast.train.run import train_run

from helpers import tiny_run_config


def small_run(tmp_path, name="run", **optim) -> RunConfig:
    o = dict(batch_size=16, grad_accum=2, lr_mm=1e-3, lr_av=1e-3, warmup_epochs=0.5, cosine_epochs=6,
             max_epochs=6, early_stop=6, key_metric="MAE")
    o.update(optim)
    model = ModelConfig(
        backbone="tiny-llama",
        av=AVEncoderConfig(max_len=20, p_perm=0.1),
        fusion=FusionConfig(n_tokens=4, mm_layers=(2, 3), n_heads=8),
        text=TextConfig(max_tokens=32),
        loss=LossConfig(w_fusion=0.4, w_av=0.8, w_text=0.8, w_clm=0.1),
    )
    return tiny_run_config(tmp_path / name, model, data=DataConfig(dataset="mosi", synthetic_sizes=(192, 96, 96)),
                           optim=OptimConfig(**o), pretrain=AVPretrainConfig(lr=1e-3, max_epochs=3, grad_accum=1))


def test_training_run_lowers_the_loss_and_writes_the_contract(tmp_path):
    # A random tiny LM cannot read the sentences, so only the optimisation itself is checked
    # here; tests/train/test_learning.py checks what is learned with the real SmolLM2-135M.
    cfg = small_run(tmp_path)
    results = train_run(cfg)
    seed = results["per_seed"]["7"]
    history = json.loads((tmp_path / "run" / "seed_7" / "last" / "state.json").read_text())["history"]
    train_losses = [h["train"]["total"] for h in history]
    assert train_losses[-1] < 0.8 * train_losses[0], train_losses
    for key in METRIC_KEYS["mosi"]:
        assert key in results and results[key] == seed["test"][key]
    assert seed["epochs"] == 6 and 1 <= seed["best_epoch"] <= 6
    assert (tmp_path / "run" / "config.json").exists() and (tmp_path / "run" / "results.json").exists()
    weights = load_weights(tmp_path / "run" / "seed_7" / "best.safetensors")
    assert weights and not any(k.startswith("lm.") for k in weights)


def test_interrupted_run_resumes_to_the_same_parameters(tmp_path):
    straight = small_run(tmp_path, "straight", max_epochs=3)
    train_run(straight)

    interrupted = small_run(tmp_path, "interrupted", max_epochs=3)

    def crash_in_third_epoch(stage: int, epoch: int, batch: int) -> None:
        if stage == 2 and epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(interrupted, on_batch=[crash_in_third_epoch])
    assert not (tmp_path / "interrupted" / "results.json").exists()
    train_run(interrupted)  # same configuration: continues from the last finished epoch

    a = load_weights(tmp_path / "straight" / "seed_7" / "last" / "model.safetensors")
    b = load_weights(tmp_path / "interrupted" / "seed_7" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    ra = json.loads((tmp_path / "straight" / "results.json").read_text())
    rb = json.loads((tmp_path / "interrupted" / "results.json").read_text())
    assert ra["MAE"] == pytest.approx(rb["MAE"], abs=1e-6)


def test_a_different_configuration_never_mixes_into_an_existing_run(tmp_path):
    from deepmlf_fast.errors import ConfigError

    cfg = small_run(tmp_path, max_epochs=1)
    train_run(cfg)
    changed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fusion=FusionConfig(n_tokens=2, mm_layers=(3,), n_heads=8)))
    with pytest.raises(ConfigError, match="different configuration"):
        train_run(changed)


def test_a_nan_validation_metric_keeps_a_best_checkpoint_and_says_so(tmp_path, monkeypatch, caplog):
    """Every validation value of both stages is NaN: the run still ends with test metrics and
    best weights (the first epoch's, the only candidates), and the log says why."""
    from deepmlf_fast.train import stage1

    def nan_metrics(*args, **kwargs):
        return {**evaluate(*args, **kwargs), "MAE": float("nan")}

    evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", nan_metrics)
    monkeypatch.setattr(stage1, "_valid_loss", lambda *a: float("nan"))
    cfg = small_run(tmp_path, max_epochs=2, cosine_epochs=2, early_stop=5)
    cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, max_epochs=2),
                              data=dataclasses.replace(cfg.data, synthetic_sizes=(48, 16, 16)))
    with caplog.at_level("WARNING"):
        results = train_run(cfg)
    assert results["per_seed"]["7"]["best_epoch"] == 1 and results["per_seed"]["7"]["epochs"] == 2
    assert (tmp_path / "run" / "seed_7" / "best.safetensors").is_file()
    assert "no epoch had a finite valid MAE: the weights kept are epoch 1's" in caplog.text
    assert "stage 1 epoch 1: valid L1 is nan" in caplog.text


@pytest.mark.parametrize("verdicts, reads", [((True, True), 0), ((True, False), 1)])
def test_stage_two_ends_at_the_best_weights_reading_them_back_only_when_memory_holds_others(
        tmp_path, monkeypatch, verdicts, reads):
    """Epoch 2 the best (its weights were just written): memory holds the best checkpoint's values
    and the file is not read back (at 7B a second copy of every trained weight was the run's
    memory peak); epoch 1 the best: read back. Either way the model ends equal to the file."""
    from deepmlf_fast.train.run import run_training

    answers = iter(verdicts)
    monkeypatch.setattr(loop, "is_new_best", lambda *a: next(answers))
    read = []
    monkeypatch.setattr(loop, "load_weights", lambda path: read.append(path) or load_weights(path))
    cfg = small_run(tmp_path, max_epochs=2, cosine_epochs=2)
    cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, enabled=False),
                              data=dataclasses.replace(cfg.data, synthetic_sizes=(48, 16, 16)))
    results, session = run_training(cfg)
    assert results["per_seed"]["7"]["best_epoch"] == (2 if verdicts[1] else 1)
    assert [p.name for p in read] == ["best.safetensors"] * reads
    ended = session.trained_models[7].trained_state_dict()
    best = load_weights(tmp_path / "run" / "seed_7" / "best.safetensors")
    assert ended.keys() == best.keys() and all(torch.equal(ended[k], best[k]) for k in best)


def _seed_result(seed: int) -> dict:
    """A made-up per-seed result (what `_run_seed` returns): every MOSI metric differs by seed."""
    test = {key: round(0.1 * (i + 1) + 0.37 * seed + (0.05 * seed) ** 2, 6)
            for i, key in enumerate(METRIC_KEYS["mosi"])}
    return {"test": test, "valid": {"MAE": 1.0 + seed}, "best_epoch": 1, "epochs": 1}


def test_results_are_the_mean_and_population_std_over_seeds(tmp_path, monkeypatch):
    """results.json over three seeds (with `_run_seed` stubbed: no training): each top-level
    metric is the mean of the per-seed test values, `std` their population std (numpy's
    default, ddof 0), computed here with the statistics module; per_seed keeps every seed."""
    from deepmlf_fast.train import run

    seeds = (3, 11, 4)
    monkeypatch.setattr(run, "_run_seed", lambda session, seed, run_dir: _seed_result(seed))
    cfg = small_run(tmp_path)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seeds=seeds))
    returned = train_run(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert returned == results
    assert results["seeds"] == list(seeds) and results["per_seed"] == {str(s): _seed_result(s) for s in seeds}
    assert set(results["std"]) == set(METRIC_KEYS["mosi"]) and results["metric_names"] == list(METRIC_KEYS["mosi"])
    for key in METRIC_KEYS["mosi"]:
        values = [_seed_result(s)["test"][key] for s in seeds]
        assert results[key] == pytest.approx(statistics.fmean(values), rel=1e-12), key
        assert results["std"][key] == pytest.approx(statistics.pstdev(values), rel=1e-9), key
        assert results["std"][key] > 0.3, key  # the seeds really differ
