"""The shapes and label conventions of the three MMSA datasets (reference §3.1).

`DATASETS` is the one list of dataset names: the config's `DatasetName`, the CLI's `--dataset`
choices and the released recipe of each dataset (`presets.DATASET_RECIPE`) are made from it,
so a new dataset is one `DatasetSpec` row here (plus a recipe in `presets` to train it without
`--preset`). Its `scale` picks the label scale, metrics and classes it shares with the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deepmlf_fast.errors import ConfigError


LabelScale = Literal["mosi", "sims"]


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset's MMSA files look like."""

    name: str
    scale: LabelScale
    """MMSA's label scale and evaluation family: "mosi" (MOSI, MOSEI: [-3, 3], Has0/Non0 binary
    accuracies, 7 classes) or "sims" ([-1, 1], interval classes): the metrics
    (`metrics.METRIC_KEYS`), the sentiment classes and the sweep's plotted metrics follow it."""
    audio_dim: int
    vision_dim: int
    text_len: int
    """Token length L the released recipes use (50, or 39 for SIMS)."""
    audio_len_unaligned: int
    vision_len_unaligned: int
    aligned_len: int | None
    """Length of the `aligned_50.pkl` files (None: no aligned release)."""
    label_min: float
    label_max: float
    split_sizes: tuple[int, int, int]
    """train / valid / test sample counts of the real release."""
    file_name: str
    """The released unaligned file name."""

    def widths(self, audio_dim: int | None = None, vision_dim: int | None = None) -> tuple[int, int]:
        """(Da, Dv) a file of this dataset must have: the given widths, else the standard ones."""
        return (self.audio_dim if audio_dim is None else audio_dim,
                self.vision_dim if vision_dim is None else vision_dim)


DATASETS: dict[str, DatasetSpec] = {
    "mosi": DatasetSpec("mosi", "mosi", 5, 20, 50, 375, 500, 50, -3.0, 3.0, (1284, 229, 686), "unaligned_50.pkl"),
    "mosei": DatasetSpec("mosei", "mosi", 74, 35, 50, 500, 500, 50, -3.0, 3.0, (16326, 1871, 4659), "unaligned_50.pkl"),
    "sims": DatasetSpec("sims", "sims", 33, 709, 39, 400, 55, None, -1.0, 1.0, (1368, 456, 457), "unaligned_39.pkl"),
}
DatasetName = Literal[tuple(DATASETS)]


def dataset_spec(name: str) -> DatasetSpec:
    """Return the spec of a dataset name (a key of `DATASETS`, any case)."""
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise ConfigError(f"dataset: expected one of {sorted(DATASETS)}, found {name!r}") from None
