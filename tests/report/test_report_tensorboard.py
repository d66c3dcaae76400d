"""TensorBoard scalars written during training, and nothing without the optional package."""

from __future__ import annotations

import json
import sys

import pytest


def test_training_writes_tensorboard_scalars(demo_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = json.loads((demo_run / "config.json").read_text())
    history = json.loads((demo_run / "seed_1" / "last" / "state.json").read_text())["history"]
    events = EventAccumulator(str(demo_run / "tb" / "seed_1"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for term in ("task", "fusion", "av", "text", "total"):
        assert f"step/{term}" in tags and f"epoch/train/{term}" in tags, term
    for tag in ("step/lr", "step/seconds_per_step", "step/samples_per_s", "epoch/lr", "epoch/seconds",
                "epoch/valid/MAE", "epoch/valid/Corr", "epoch/valid/MAE_av"):
        assert tag in tags, tag
    for block in config["model"]["fusion"]["mm_layers"]:
        for half in ("attn", "ffn"):
            points = events.Scalars(f"epoch/gates/block_{block}/{half}")
            assert [p.step for p in points] == [e["epoch"] for e in history]
            assert [p.value for p in points] == pytest.approx([e["gates"][str(block)][half] for e in history])
    assert [p.value for p in events.Scalars("epoch/valid/MAE")] == pytest.approx([e["valid"]["MAE"] for e in history])
    assert len(events.Scalars("step/total")) == len(history) * 3  # log_every=1, 48 samples in batches of 16
    assert (demo_run / "tb" / "seed_2").is_dir()


def test_no_tensorboard_means_no_recorder_and_no_folder(tmp_path, monkeypatch):
    from deepmlf_fast.train.tensorboard import tensorboard_recorder

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    assert tensorboard_recorder(tmp_path / "tb" / "seed_1") is None
    assert not (tmp_path / "tb").exists()
