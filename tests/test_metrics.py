"""MMSA metrics against hand-computed values."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from deepmlf_fast.errors import DataError
from deepmlf_fast.metrics import METRIC_KEYS, format_metrics, msa_metrics, sims_classes, weighted_f1

# zeros, exact .5 ties, and values beyond the clip ranges
PRED = np.array([0.5, -0.5, 1.5, 2.5, -4.0, 0.0, 2.4, 3.0])
TRUTH = np.array([0.0, -1.0, 2.0, 2.0, -3.0, 0.0, -0.6, 2.4])


def test_mosi_by_hand():
    m = msa_metrics(PRED, TRUTH, "mosi")
    assert tuple(m) == METRIC_KEYS["mosi"]
    # Has0: p >= 0 vs y >= 0 -> 7/8; F1 per class: True 2*5/(6+5), False 2*2/(2+3), supports 5 / 3
    assert m["Has0_acc_2"] == pytest.approx(7 / 8)
    assert m["Has0_F1_score"] == pytest.approx((5 * 10 / 11 + 3 * 4 / 5) / 8)
    # Non0: samples 1,2,3,4,6,7; p > 0 vs y > 0 -> 5/6; F1: True 2*3/(4+3), False 2*2/(2+3)
    assert m["Non0_acc_2"] == pytest.approx(5 / 6)
    assert m["Non0_F1_score"] == pytest.approx((3 * 6 / 7 + 3 * 4 / 5) / 6)
    # half to even: 0.5 -> 0, -0.5 -> -0, 2.5 -> 2; -4 clipped to -3 (acc7) / -2 (acc5); 3 -> 2 in acc5
    assert m["Mult_acc_7"] == pytest.approx(5 / 8)
    assert m["Mult_acc_5"] == pytest.approx(6 / 8)
    # MAE and Corr on unclipped values
    assert m["MAE"] == pytest.approx((0.5 + 0.5 + 0.5 + 0.5 + 1.0 + 0.0 + 3.0 + 0.6) / 8)
    assert m["Corr"] == pytest.approx(np.corrcoef(PRED, TRUTH)[0, 1])
    assert m["Corr"] != pytest.approx(np.corrcoef(np.clip(PRED, -3, 3), TRUTH)[0, 1])


def test_round_half_to_even():
    pred = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    truth = np.array([0.0, 2.0, 2.0, 0.0, -2.0, -2.0])
    m = msa_metrics(pred, truth, "mosei")
    assert m["Mult_acc_7"] == 1.0 and m["Mult_acc_5"] == 1.0


def test_torch_float32_column_input_matches():
    m = msa_metrics(torch.tensor(PRED, dtype=torch.float32)[:, None], torch.tensor(TRUTH, dtype=torch.float32), "mosi")
    ref = msa_metrics(PRED, TRUTH, "mosi")
    for key in ref:
        assert m[key] == pytest.approx(ref[key], rel=1e-6), key
    assert msa_metrics(torch.tensor(PRED, dtype=torch.bfloat16), TRUTH, "mosi")["Has0_acc_2"] == ref["Has0_acc_2"]


def test_weighted_f1_by_hand():
    truth = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 3])
    # class 0: 2*1/(1+2); class 1: 2*2/(3+2); class 2: 0 (never predicted); class 3: weight 0
    assert weighted_f1(pred, truth) == pytest.approx((2 * 2 / 3 + 2 * 4 / 5 + 1 * 0) / 5)
    assert weighted_f1(np.array([1, 1]), np.array([1, 1])) == 1.0


def test_sims_bins_at_edges():
    x = np.array([-1.0, -0.7, -0.69, -0.1, -0.09, 0.0, 0.01, 0.1, 0.11, 0.7, 0.71, 1.0])
    assert sims_classes(x, 2).tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert sims_classes(x, 3).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert sims_classes(x, 5).tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4]
    # float32 inputs compare in float32 like MMSA: float32(0.1) sits on the (−0.1, 0.1] edge
    assert sims_classes(np.array([0.1, -0.1, 0.7], np.float32), 5).tolist() == [2, 1, 3]


def test_sims_by_hand():
    truth = np.array([-1.0, -0.2, 0.0, 0.4, 1.0])
    pred = np.array([-1.4, 0.0, 0.05, 0.8, 0.6])  # -1.4 is clipped to -1
    m = msa_metrics(pred, truth, "sims")
    assert tuple(m) == METRIC_KEYS["sims"]
    assert m["Mult_acc_2"] == pytest.approx(4 / 5)  # zero is negative: pred classes [0,0,1,1,1]
    assert m["F1_score"] == pytest.approx((3 * 4 / 5 + 2 * 4 / 5) / 5)
    assert m["Mult_acc_3"] == pytest.approx(4 / 5)
    assert m["Mult_acc_5"] == pytest.approx(2 / 5)
    assert m["MAE"] == pytest.approx((0 + 0.2 + 0.05 + 0.4 + 0.4) / 5)  # on clipped values
    assert m["Corr"] == pytest.approx(np.corrcoef(np.clip(pred, -1, 1), truth)[0, 1])


def test_undefined_values_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = msa_metrics(np.ones(4), np.array([0.0, 0.0, 0.0, 0.0]), "mosi")
        s = msa_metrics(np.array([0.3]), np.array([0.2]), "sims")
    assert np.isnan(m["Corr"]) and np.isnan(m["Non0_acc_2"]) and np.isnan(m["Non0_F1_score"])
    assert m["Has0_acc_2"] == 1.0 and np.isnan(s["Corr"])


@pytest.mark.parametrize(
    "pred, truth, pattern",
    [
        (np.zeros(3), np.zeros(4), r"pred: expected 4 values like truth, found 3"),
        (np.zeros(0), np.zeros(0), r"pred: expected shape \(N,\) or \(N, 1\) with N >= 1, found \(0,\)"),
        (np.zeros((3, 2)), np.zeros(3), r"pred: expected shape .* found \(3, 2\)"),
        (np.array([0.0, np.nan]), np.zeros(2), r"pred: expected finite values, found nan at index 1"),
        (np.zeros(2), np.array([0.0, np.inf]), r"truth: expected finite values, found inf at index 1"),
    ],
)
def test_bad_inputs(pred, truth, pattern):
    with pytest.raises(DataError, match=pattern):
        msa_metrics(pred, truth, "mosi")


def test_format_metrics():
    line = format_metrics({"MAE": 0.825, "Corr": float("nan"), "Has0_acc_2": 7 / 8})
    assert line == "MAE=0.8250 Corr=nan Has0_acc_2=0.8750"
