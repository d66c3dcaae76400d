"""Loading, validation and the safe .npz format of MMSA files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from deepmlf_fast.data.mmsa import convert_pickle, from_mmsa_dict, load_mmsa, save_npz
from deepmlf_fast.errors import DataError


def write_pkl(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def assert_same(a, b):
    for name in ("train", "valid", "test"):
        x, y = a.split(name), b.split(name)
        assert x.raw_text == y.raw_text and x.ids == y.ids
        for field in ("audio", "vision", "labels", "audio_lengths", "vision_lengths"):
            u, v = getattr(x, field), getattr(y, field)
            assert (u is None and v is None) or (np.array_equal(u, v) and u.dtype == v.dtype), field


def test_load_valid_pickle(tmp_path, make_raw):
    raw = make_raw()
    data = load_mmsa(write_pkl(tmp_path / "d.pkl", raw), "mosi")
    s = data.train
    assert len(s) == 4 and data.feature_dims == (5, 20) and data.dataset == "mosi"
    assert s.audio.dtype == np.float32 and s.audio.shape == (4, 6, 5)
    assert s.labels.dtype == np.float32 and s.audio_lengths.dtype == np.int64
    assert s.raw_text == list(raw["train"]["raw_text"]) and s.ids[0] == "vidtrain$_$0"
    assert np.array_equal(s.labels, raw["train"]["regression_labels"])
    assert data.split("valid") is data.valid


def test_loading_writes_nothing(tmp_path, make_raw):
    path = write_pkl(tmp_path / "d.pkl", make_raw())
    load_mmsa(path, "mosi")
    bad = make_raw()
    bad["test"]["regression_labels"][0] = 9.0
    with pytest.raises(DataError):
        load_mmsa(write_pkl(tmp_path / "bad.pkl", bad), "mosi")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pkl", "d.pkl"]


def test_neg_inf_zeroed_and_counted(tmp_path, make_raw):
    raw = make_raw()
    raw["train"]["audio"][1, 2, 3] = -np.inf
    raw["train"]["audio"][2, 5, 0] = -np.inf
    raw["valid"]["vision"][0, 0, 0] = -np.inf
    data = load_mmsa(write_pkl(tmp_path / "d.pkl", raw), "mosi")
    assert data.train.audio[1, 2, 3] == 0 and data.train.audio[2, 5, 0] == 0
    assert data.train.zeroed_neg_inf == 2 and data.valid.zeroed_neg_inf == 1 and data.test.zeroed_neg_inf == 0
    assert np.isfinite(data.train.audio).all()


def test_from_dict_does_not_mutate_input(make_raw):
    raw = make_raw()
    raw["train"]["audio"][0, 0, 0] = -np.inf
    data = from_mmsa_dict(raw, "mosi")
    assert raw["train"]["audio"][0, 0, 0] == -np.inf and data.train.audio[0, 0, 0] == 0


def test_custom_dims_accepted(make_raw):
    raw = make_raw()
    for split in raw.values():
        split["audio"] = np.zeros((4, 6, 7), np.float32)
    assert from_mmsa_dict(raw, "mosi", audio_dim=7).feature_dims == (7, 20)


def test_aligned_property(make_raw):
    raw = make_raw(ta=6, tv=6)
    assert not from_mmsa_dict(raw, "mosi").aligned  # MOSEI-like: equal T, different lengths
    for split in raw.values():
        split["vision_lengths"] = split["audio_lengths"].copy()
    assert from_mmsa_dict(raw, "mosi").aligned
    for split in raw.values():
        del split["audio_lengths"], split["vision_lengths"]
    assert from_mmsa_dict(raw, "mosi").aligned
    assert not from_mmsa_dict(make_raw(ta=6, tv=8), "mosi").aligned


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.pkl: data file not found"):
        load_mmsa(tmp_path / "nope.pkl", "mosi")


def test_not_a_dict(tmp_path):
    with pytest.raises(DataError, match=r"l\.pkl: expected a dict with keys.*found list"):
        load_mmsa(write_pkl(tmp_path / "l.pkl", [1, 2]), "mosi")


def test_not_a_pickle(tmp_path):
    path = tmp_path / "junk.pkl"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match=r"junk\.pkl: cannot unpickle"):
        load_mmsa(path, "mosi")


def test_missing_split(tmp_path, make_raw):
    raw = make_raw()
    del raw["valid"]
    with pytest.raises(DataError, match=r"d\.pkl: missing split 'valid'; found keys \['test', 'train'\]"):
        load_mmsa(write_pkl(tmp_path / "d.pkl", raw), "mosi")


@pytest.mark.parametrize("key", ["raw_text", "audio", "vision", "regression_labels", "id"])
def test_missing_key(tmp_path, make_raw, key):
    raw = make_raw()
    del raw["test"][key]
    with pytest.raises(DataError, match=rf"d\.pkl \[test\]: missing key '{key}'"):
        load_mmsa(write_pkl(tmp_path / "d.pkl", raw), "mosi")


def bad_case(make_raw, split, field, value, dataset="mosi", **kw):
    raw = make_raw()
    raw[split][field] = value(raw[split][field]) if callable(value) else value
    return lambda: from_mmsa_dict(raw, dataset, "f.pkl", **kw)


@pytest.mark.parametrize(
    "split, field, value, pattern",
    [
        ("train", "audio", np.zeros((4, 6), np.float32), r"\[train\]: audio: expected a 3-D array .* found shape \(4, 6\)"),
        ("valid", "audio", np.zeros((4, 6, 7), np.float32), r"\[valid\]: audio: expected feature dim 5, found shape \(4, 6, 7\)"),
        ("test", "vision", np.zeros((4, 6, 35), np.float32), r"\[test\]: vision: expected feature dim 20, found shape \(4, 6, 35\)"),
        ("train", "audio", np.zeros((0, 6, 5), np.float32), r"audio: expected at least one sample, found shape \(0, 6, 5\)"),
        ("train", "audio", np.array([[["a"] * 5] * 6] * 4), r"audio: expected a float array, found dtype <U1"),
        ("train", "vision", np.zeros((3, 6, 20), np.float32), r"vision: expected 4 samples like audio, found shape \(3, 6, 20\)"),
        ("train", "regression_labels", np.zeros(3, np.float32), r"regression_labels: expected shape \(4,\) like audio, found \(3,\)"),
        ("train", "raw_text", ["a", "b", "c"], r"raw_text: expected 4 entries like audio, found 3"),
        ("train", "raw_text", ["a", 7, "c", "d"], r"raw_text\[1\]: expected a string, found int 7"),
        ("valid", "raw_text", ["a", "b", "   ", "d"], r"\[valid\]: raw_text\[2\]: expected a non-empty transcript, found '   '"),
        ("train", "raw_text", ["", "b", "c", "d"], r"raw_text\[0\]: expected a non-empty transcript, found ''"),
        ("test", "id", np.array(["x"] * 5), r"\[test\]: id: expected 4 entries like audio, found 5"),
        ("train", "audio_lengths", np.array([1, 2, 3, -1]), r"audio_lengths: expected integers in \[0, 6\] .*found -1 in sample 3"),
        ("train", "vision_lengths", np.array([1, 7, 3, 1]), r"vision_lengths: expected integers in \[0, 6\] .*found 7 in sample 1"),
        ("train", "audio_lengths", np.array([1.0, 2.5, 3.0, 1.0]), r"audio_lengths: expected integers .*found 2\.5 in sample 1"),
        ("train", "audio_lengths", np.array([1, 2]), r"audio_lengths: expected shape \(4,\) like audio, found \(2,\)"),
    ],
)
def test_structure_errors(make_raw, split, field, value, pattern):
    with pytest.raises(DataError, match=pattern):
        bad_case(make_raw, split, field, value)()


def test_feature_dims_must_match_across_splits(make_raw):
    raw = make_raw()
    for split in ("train", "valid"):
        raw[split]["audio"] = np.zeros((4, 6, 7), np.float32)
    with pytest.raises(DataError, match=r"\[test\]: audio: expected feature dim 7, found shape \(4, 6, 5\)"):
        from_mmsa_dict(raw, "mosi", audio_dim=7)


def with_value(index, value):
    def edit(x):
        x = x.copy()
        x[index] = value
        return x

    return edit


@pytest.mark.parametrize(
    "field, index, value, pattern",
    [
        ("vision", (2, 1, 4), np.nan, r"vision: expected finite values, found nan in sample 2"),
        ("audio", (1, 0, 0), np.inf, r"audio: expected finite values, found inf in sample 1"),
        ("regression_labels", 3, np.nan, r"regression_labels: expected finite values in \[-3\.0, 3\.0\], found nan in sample 3"),
        ("regression_labels", 0, 3.5, r"regression_labels: expected finite values in \[-3\.0, 3\.0\], found 3\.5 in sample 0"),
        ("regression_labels", 1, -np.inf, r"regression_labels: .*found -inf in sample 1"),
    ],
)
def test_value_errors(make_raw, field, index, value, pattern):
    with pytest.raises(DataError, match=pattern):
        bad_case(make_raw, "valid", field, with_value(index, value))()


def test_sims_label_range(make_raw):
    raw = make_raw()
    for split in raw.values():
        split["audio"] = np.zeros((4, 6, 33), np.float32)
        split["vision"] = np.zeros((4, 6, 709), np.float32)
        split["regression_labels"] = np.array([-1.0, 0.0, 0.4, 1.0], np.float32)
    from_mmsa_dict(raw, "sims")
    raw["train"]["regression_labels"][2] = 1.2
    with pytest.raises(DataError, match=r"\[-1\.0, 1\.0\], found 1\.2 in sample 2"):
        from_mmsa_dict(raw, "sims")


def test_pickle_npz_roundtrip(tmp_path, make_raw):
    raw = make_raw()
    raw["train"]["audio"][0, 1, 2] = -np.inf
    raw["train"]["raw_text"][1] = "ünïcödé — text ☺"
    del raw["test"]["audio_lengths"], raw["test"]["vision_lengths"]
    src = write_pkl(tmp_path / "d.pkl", raw)
    dst = convert_pickle(src, tmp_path / "d.npz", "mosi")
    with np.load(dst, allow_pickle=False) as z:  # plain arrays only
        assert "train.audio" in z.files and "test.audio_lengths" not in z.files
    a, b = load_mmsa(src, "mosi"), load_mmsa(dst, "mosi")
    assert_same(a, b)
    assert b.train.raw_text[1] == "ünïcödé — text ☺" and b.test.audio_lengths is None
    assert b.train.audio[0, 1, 2] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "d.pkl"]  # no temporary left


def test_npz_detected_by_content(tmp_path, make_raw):
    data = from_mmsa_dict(make_raw(), "mosi")
    path = save_npz(data, tmp_path / "named_like.pkl")
    assert_same(load_mmsa(path, "mosi"), data)


def test_npz_wrong_meta(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, meta=np.frombuffer(b'{"format": "else"}', np.uint8))
    with pytest.raises(DataError, match=r"meta: expected format 'deepmlf-mmsa-npz' version 1, found"):
        load_mmsa(path, "mosi")


def test_unknown_split_name(make_raw):
    with pytest.raises(DataError, match=r"split: expected one of .* found 'dev'"):
        from_mmsa_dict(make_raw(), "mosi").split("dev")
