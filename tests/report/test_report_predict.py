"""`deepmlf predict`: every head's prediction and the sentiment classes, also for unlabeled samples."""

from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pytest

from deepmlf_fast.cli import main
from deepmlf_fast.report.classes import class_names, sentiment_classes

COLUMNS = ["id", "label", "label_class", "pred", "pred_text", "pred_av", "pred_fusion", "pred_class"]


def test_classes_are_mmsa_rounding():
    mosi = np.array([-3.2, -2.5, -2.51, -1.5, -1.49, -0.5, 0.5, 0.51, 1.5, 2.5, 2.51, np.nan], dtype=np.float32)
    assert list(sentiment_classes(mosi, "mosi") - 3) == [-3, -2, -3, -2, -1, 0, 0, 1, 2, 2, 3, -4]
    sims = np.array([-1.0, -0.7, -0.69, -0.1, 0.1, 0.11, 0.7, 0.71, 1.0])
    assert list(sentiment_classes(sims, "sims")) == [0, 0, 1, 1, 2, 3, 3, 4, 4]
    assert len(class_names("mosei")) == 7 and class_names("sims")[2] == "neutral"
    # The classes the metrics count: Mult_acc_7 is the accuracy of these classes.
    from deepmlf_fast.metrics import msa_metrics

    rng = np.random.default_rng(0)
    p, y = rng.uniform(-3.5, 3.5, 200), np.round(rng.uniform(-3, 3, 200) * 3) / 3
    agree = np.mean(sentiment_classes(p, "mosi") == sentiment_classes(y, "mosi"))
    assert agree == pytest.approx(msa_metrics(p, y, "mosi")["Mult_acc_7"])


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_writes_every_head_and_the_classes(demo_run, tmp_path):
    out = tmp_path / "pred.csv"
    assert main(["-q", "predict", "--run", str(demo_run), "--out", str(out)]) == 0
    rows = _rows(out)
    assert list(rows[0]) == COLUMNS and len(rows) == 24
    names = class_names("mosi")
    for row in rows:
        assert row["label_class"] == names[sentiment_classes(np.array([float(row["label"])]), "mosi")[0]]
        assert row["pred_class"] == names[sentiment_classes(np.array([float(row["pred"])]), "mosi")[0]]
    preds = np.array([float(r["pred"]) for r in rows])
    labels = np.array([float(r["label"]) for r in rows])
    results = json.loads((demo_run / "results.json").read_text())["per_seed"]["1"]["test"]
    assert np.abs(preds - labels).mean() == pytest.approx(results["MAE"], abs=1e-4)


def test_predict_reads_new_samples_without_labels(demo_run, tmp_path, capsys):
    config = json.loads((demo_run / "config.json").read_text())
    from deepmlf_fast.train.run import demo_data_path
    from deepmlf_fast.config import RunConfig

    with open(demo_data_path(RunConfig.from_dict(config)), "rb") as f:
        test = pickle.load(f)["test"]
    new = {k: v for k, v in test.items() if not k.startswith("regression_labels")}
    new["id"] = [f"new_{i}" for i in range(len(new["id"]))]
    path = tmp_path / "new.pkl"
    with open(path, "wb") as f:
        pickle.dump({"test": new}, f)  # one split, no labels

    out = tmp_path / "new.csv"
    assert main(["-q", "predict", "--run", str(demo_run), "--data", str(path), "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 24 and {r["id"] for r in rows} == set(new["id"])
    assert all(r["label"] == "" and r["label_class"] == "" for r in rows)
    assert all(r["pred_class"] in class_names("mosi") and float(r["pred_av"]) == float(r["pred_av"]) for r in rows)
    # The same samples with their labels give the same predictions.
    labelled = tmp_path / "labelled.csv"
    assert main(["-q", "predict", "--run", str(demo_run), "--out", str(labelled)]) == 0
    by_id = {r["id"].replace("new_", ""): r["pred"] for r in rows}
    ids = [r["id"] for r in _rows(labelled)]
    assert [float(r["pred"]) for r in _rows(labelled)] == pytest.approx(
        [float(by_id[str(list(test["id"]).index(i))]) for i in ids], abs=1e-5)
    # Evaluation still needs labels and says so.
    assert main(["-q", "eval", "--run", str(demo_run), "--data", str(path)]) == 2
    assert "missing split 'train'" in capsys.readouterr().err


def test_labels_and_splits_are_optional_only_for_new_samples(tmp_path):
    from deepmlf_fast.data import from_mmsa_dict, make_synthetic
    from deepmlf_fast.errors import DataError

    with open(make_synthetic(tmp_path / "d.pkl", "sims", 4, 4, 3), "rb") as f:
        raw = pickle.load(f)
    test = {k: v for k, v in raw["test"].items() if k != "regression_labels"}
    with pytest.raises(DataError, match="missing key 'regression_labels'"):
        from_mmsa_dict({**raw, "test": test}, "sims")
    with pytest.raises(DataError, match="missing split 'train'"):
        from_mmsa_dict({"test": raw["test"]}, "sims")
    data = from_mmsa_dict({"test": test}, "sims", require_labels=False)
    assert np.isnan(data.test.labels).all() and len(data.test) == 3
    assert data.train is data.test and data.valid is data.test  # absent splits are the present one
    labelled = from_mmsa_dict({"valid": raw["valid"], "test": test}, "sims", require_labels=False)
    assert np.isfinite(labelled.valid.labels).all() and labelled.train is labelled.valid
