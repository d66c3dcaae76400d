"""The shapes and label conventions of the three MMSA datasets (reference §3.1)."""

from __future__ import annotations

from dataclasses import dataclass

from deepmlf_fast.errors import ConfigError


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset's MMSA files look like."""

    name: str
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


DATASETS: dict[str, DatasetSpec] = {
    "mosi": DatasetSpec("mosi", 5, 20, 50, 375, 500, 50, -3.0, 3.0, (1284, 229, 686), "unaligned_50.pkl"),
    "mosei": DatasetSpec("mosei", 74, 35, 50, 500, 500, 50, -3.0, 3.0, (16326, 1871, 4659), "unaligned_50.pkl"),
    "sims": DatasetSpec("sims", 33, 709, 39, 400, 55, None, -1.0, 1.0, (1368, 456, 457), "unaligned_39.pkl"),
}


def dataset_spec(name: str) -> DatasetSpec:
    """Return the spec of 'mosi', 'mosei' or 'sims'."""
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise ConfigError(f"dataset: expected one of {sorted(DATASETS)}, found {name!r}") from None
