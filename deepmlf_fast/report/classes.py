"""Sentiment classes of regression scores, as MMSA rounds them for its multi-class accuracies.

    MOSI / MOSEI (7 classes, `Mult_acc_7`): round(clip(x, -3, 3)) to the nearest integer,
        halves to even (numpy's rounding, as MMSA's `np.round`):
        -3 strongly negative   x <  -2.5
        -2 negative            -2.5 <= x <= -1.5   (-2.5 and -1.5 round to -2)
        -1 weakly negative     -1.5 <  x <  -0.5
         0 neutral             -0.5 <= x <=  0.5
         1 weakly positive      0.5 <  x <   1.5
         2 positive             1.5 <= x <=  2.5
         3 strongly positive    x >   2.5
    SIMS (5 classes, `Mult_acc_5`): clip(x, -1, 1), right-closed intervals of
        `metrics.SIMS_EDGES[5]`:
        negative [-1, -0.7], weakly negative (-0.7, -0.1], neutral (-0.1, 0.1],
        weakly positive (0.1, 0.7], positive (0.7, 1]

The arithmetic is `metrics`' own (the same expressions on the same dtype), so a class here
is the class the metrics count.
"""

from __future__ import annotations

import numpy as np

from deepmlf_fast.data.specs import dataset_spec
from deepmlf_fast.metrics import sims_classes

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mosi": ("strongly negative", "negative", "weakly negative", "neutral", "weakly positive", "positive",
             "strongly positive"),
    "sims": ("negative", "weakly negative", "neutral", "weakly positive", "positive"),
}


def class_names(dataset: str) -> tuple[str, ...]:
    """Names of the 7 (MOSI, MOSEI) or 5 (SIMS) sentiment classes, most negative first."""
    return CLASS_NAMES["sims" if dataset_spec(dataset).name == "sims" else "mosi"]


def sentiment_classes(values: np.ndarray, dataset: str) -> np.ndarray:
    """Class index `(N,)` int64 in [0, C) of scores `values (N,)`; -1 where a value is NaN
    (an unlabeled sample)."""
    x = np.asarray(values)
    x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)
    known = np.isfinite(x)
    out = np.full(x.shape, -1, dtype=np.int64)
    if dataset_spec(dataset).name == "sims":
        out[known] = sims_classes(np.clip(x[known], -1.0, 1.0), 5)
    else:
        out[known] = np.round(np.clip(x[known], -3.0, 3.0)).astype(np.int64) + 3
    return out
