"""Named sentiment classes of regression scores: the classes MMSA counts in its multi-class
accuracies, `metrics.mosi_classes` (MOSI, MOSEI: 7 classes, `Mult_acc_7`) and
`metrics.sims_classes` (SIMS: 5 classes, `Mult_acc_5`), so a class here is the class the
metrics count. `CLASS_RULES` says where each class begins and ends (`deepmlf predict --help`
shows it).

The package imports are made when a function is called: the CLI's parser reads `CLASS_RULES`
and starts without numpy and torch (which the data package and `metrics` import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mosi": ("strongly negative", "negative", "weakly negative", "neutral", "weakly positive", "positive",
             "strongly positive"),
    "sims": ("negative", "weakly negative", "neutral", "weakly positive", "positive"),
}

CLASS_RULES = """\
Classes, as MMSA rounds scores for Mult_acc_7 (MOSI, MOSEI) and Mult_acc_5 (SIMS):
  MOSI/MOSEI: round(clip(score, -3, 3)), halves to even:
    strongly negative < -2.5 <= negative <= -1.5 < weakly negative < -0.5 <= neutral <= 0.5
    < weakly positive < 1.5 <= positive <= 2.5 < strongly positive
  SIMS: clip(score, -1, 1), right-closed intervals:
    negative [-1, -0.7], weakly negative (-0.7, -0.1], neutral (-0.1, 0.1],
    weakly positive (0.1, 0.7], positive (0.7, 1]
"""


def class_names(dataset: str) -> tuple[str, ...]:
    """Names of the 7 (MOSI, MOSEI) or 5 (SIMS) sentiment classes, most negative first."""
    return CLASS_NAMES[_scale(dataset)]


def sentiment_classes(values: np.ndarray, dataset: str) -> np.ndarray:
    """Class index `(N,)` int64 in [0, C) of scores `values (N,)`; -1 where a value is NaN
    (an unlabeled sample)."""
    import numpy as np

    from deepmlf_fast.metrics import mosi_classes, sims_classes

    x = np.asarray(values)
    x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)
    known = np.isfinite(x)
    out = np.full(x.shape, -1, dtype=np.int64)
    if _scale(dataset) == "sims":
        out[known] = sims_classes(np.clip(x[known], -1.0, 1.0), 5)
    else:
        out[known] = mosi_classes(x[known], 7)
    return out


def _scale(dataset: str) -> str:
    """The dataset's label scale (`DatasetSpec.scale`), which decides its classes; ConfigError
    for an unknown dataset."""
    from deepmlf_fast.data.specs import dataset_spec

    return dataset_spec(dataset).scale
