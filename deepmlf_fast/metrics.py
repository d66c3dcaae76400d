"""MMSA's regression metrics (`MMSA/utils/metricsTop.py`, reference §4), in numpy.

Definitions follow MMSA exactly, including its details: rounding half to even for the
Mult_acc_* classes, zero counted as non-negative in Has0 but as negative in SIMS'
2-class split, and comparisons made in the input's float precision (MMSA evaluates
float32 tensors). Two deliberate differences: values are not rounded to 4 decimals
(`format_metrics` does that for display), and a metric MMSA would crash or warn on
(Corr of a constant, Non0 with no non-zero truth) is NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deepmlf_fast.data.specs import dataset_spec
from deepmlf_fast.errors import DataError

METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "mosi": ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5", "Mult_acc_7", "MAE", "Corr"),
    "sims": ("Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score", "MAE", "Corr"),
}

# Interval class edges for SIMS: class k is (edges[k], edges[k + 1]]; -1.01 so that -1 is class 0.
SIMS_EDGES = {
    2: (-1.01, 0.0, 1.01),
    3: (-1.01, -0.1, 0.1, 1.01),
    5: (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01),
}


def msa_metrics(pred: Any, truth: Any, dataset: str) -> dict[str, float]:
    """MMSA metrics of predictions `pred` [N] against labels `truth` [N].

    Accepts numpy arrays or torch tensors of shape (N,) or (N, 1). Returns the keys
    `metric_keys(dataset)` in that order. Raises `DataError` on mismatched lengths,
    N = 0 or non-finite values.
    """
    scale = dataset_spec(dataset).scale
    p = _as_vector(pred, "pred")
    y = _as_vector(truth, "truth")
    if len(p) != len(y):
        raise DataError(f"pred: expected {len(y)} values like truth, found {len(p)}")
    return _sims(p, y) if scale == "sims" else _mosi(p, y)


def metric_keys(dataset: str) -> tuple[str, ...]:
    """The metric names of a dataset, in MMSA's order (`METRIC_KEYS` of its label scale)."""
    return METRIC_KEYS[dataset_spec(dataset).scale]


def format_metrics(metrics: dict[str, float]) -> str:
    """One line `key=value ...` with 4 decimals."""
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _mosi(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    non0 = y != 0
    has0_p, has0_y = p >= 0, y >= 0
    non0_p, non0_y = p[non0] > 0, y[non0] > 0
    nan = float("nan")
    return {
        "Has0_acc_2": _accuracy(has0_p, has0_y),
        "Has0_F1_score": weighted_f1(has0_p, has0_y),
        "Non0_acc_2": _accuracy(non0_p, non0_y) if non0.any() else nan,
        "Non0_F1_score": weighted_f1(non0_p, non0_y) if non0.any() else nan,
        "Mult_acc_5": _accuracy(mosi_classes(p, 5), mosi_classes(y, 5)),
        "Mult_acc_7": _accuracy(mosi_classes(p, 7), mosi_classes(y, 7)),
        "MAE": float(np.mean(np.abs(p - y))),
        "Corr": _pearson(p, y),
    }


def _sims(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    p, y = np.clip(p, -1.0, 1.0), np.clip(y, -1.0, 1.0)
    p2, y2 = sims_classes(p, 2), sims_classes(y, 2)
    return {
        "Mult_acc_2": _accuracy(p2, y2),
        "Mult_acc_3": _accuracy(sims_classes(p, 3), sims_classes(y, 3)),
        "Mult_acc_5": _accuracy(sims_classes(p, 5), sims_classes(y, 5)),
        "F1_score": weighted_f1(p2, y2),
        "MAE": float(np.mean(np.abs(p - y))),
        "Corr": _pearson(p, y),
    }


def mosi_classes(x: np.ndarray, n_classes: int) -> np.ndarray:
    """Class index [N] in [0, n_classes) of MOSI/MOSEI scores `x` [N], the classes MMSA counts in
    Mult_acc_5 (5) and Mult_acc_7 (7): round(clip(x, -b, b)) + b with b = (n_classes - 1) / 2,
    halves to even (MMSA's `np.round`), computed in x's dtype."""
    bound = (n_classes - 1) / 2
    return (np.round(np.clip(x, -bound, bound)) + bound).astype(np.int64)


def sims_classes(x: np.ndarray, n_classes: int) -> np.ndarray:
    """Class index [N] of values `x` [N] in [-1, 1]: k where edges[k] < x <= edges[k+1]."""
    # side="left" gives the first edge >= x, i.e. right-closed bins; comparisons stay in x's dtype.
    edges = np.asarray(SIMS_EDGES[n_classes], dtype=x.dtype)
    return np.searchsorted(edges, x, side="left") - 1


def weighted_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """sklearn `f1_score(truth, pred, average="weighted")` for label arrays [N].

    Per-class F1 over the labels present in truth or pred, averaged with weights equal
    to each class's true support; 0/0 counts as 0.
    """
    f1s, support = [], []
    for c in np.union1d(pred, truth):
        tp = np.sum((pred == c) & (truth == c))
        n_pred, n_true = np.sum(pred == c), np.sum(truth == c)
        f1s.append(2 * tp / (n_pred + n_true) if n_pred + n_true else 0.0)
        support.append(n_true)
    total = np.sum(support)
    return float(np.dot(f1s, support) / total) if total else 0.0


def _accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(pred == truth))


def _pearson(p: np.ndarray, y: np.ndarray) -> float:
    """np.corrcoef's r, or NaN (silently) when it is undefined."""
    if len(p) < 2 or np.all(p == p[0]) or np.all(y == y[0]):
        return float("nan")
    with np.errstate(all="ignore"):
        return float(np.corrcoef(p, y)[0, 1])


def _as_vector(x: Any, name: str) -> np.ndarray:
    """[N] or [N, 1] array/tensor -> finite [N] float32 or float64 numpy vector."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.numpy()
    x = np.asarray(x)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 1 or len(x) == 0:
        raise DataError(f"{name}: expected shape (N,) or (N, 1) with N >= 1, found {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
        raise DataError(f"{name}: expected numbers, found dtype {x.dtype}")
    x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float32 if x.dtype == np.float16 else np.float64)
    bad = np.flatnonzero(~np.isfinite(x))
    if len(bad):
        raise DataError(f"{name}: expected finite values, found {x[bad[0]]} at index {bad[0]}")
    return x
