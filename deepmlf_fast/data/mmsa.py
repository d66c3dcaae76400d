"""Load and validate MMSA-format data (reference §3.1), and convert it to a safe format.

An MMSA file is a pickled dict `{"train": {...}, "valid": {...}, "test": {...}}`; each split
is a dict of parallel arrays over its N samples. The keys read here are

    raw_text            [N] str          the transcript (the only text DeepMLF uses)
    audio               [N, Ta, Da]      zero-padded acoustic frames; may contain -inf
    vision              [N, Tv, Dv]      zero-padded visual frames
    regression_labels   [N] (or [N, 1])  sentiment in the dataset's label range
    id                  [N] str          "videoid$_$clipid"
    audio_lengths       [N] int          optional: valid frames per sample
    vision_lengths      [N] int          optional

Every other key (text, text_bert, annotations, classification_labels,
regression_labels_{T,A,V}, ...) is allowed and ignored.

New samples to predict on (`deepmlf predict`) are read with `require_labels=False`: a split
may then lack `regression_labels` (its labels are NaN), and the file may hold only some of
the three splits (an absent split is the first present one again, so a file of new samples
needs only the split it is predicted on). Training and evaluation always require both.

SECURITY: unpickling executes code stored in the file. Only open `.pkl` files from a
source you trust (the official MMSA release), and convert them once with
`convert_pickle` to the `.npz` format below, which holds plain arrays only and is read
with `allow_pickle=False`; share and archive the `.npz`.

The `.npz` format holds, for each split S, the arrays `S.audio` float32, `S.vision`
float32, `S.labels` float32, optional `S.audio_lengths`/`S.vision_lengths` int64, and
`S.raw_text`/`S.id` as UTF-8 JSON lists stored in uint8 arrays, plus a `meta` JSON record.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepmlf_fast.data.specs import dataset_spec
from deepmlf_fast.errors import DataError
from deepmlf_fast.fileio import write_npz

SPLITS = ("train", "valid", "test")
NPZ_FORMAT = "deepmlf-mmsa-npz"
NPZ_VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class MMSASplit:
    """One validated split. All arrays share the first dimension N."""

    raw_text: list[str]  # [N]
    audio: np.ndarray  # float32 [N, Ta, Da], -inf already replaced by 0
    vision: np.ndarray  # float32 [N, Tv, Dv]
    labels: np.ndarray  # float32 [N]; NaN for unlabeled samples (read with require_labels=False)
    audio_lengths: np.ndarray | None  # int64 [N], each in [0, Ta]
    vision_lengths: np.ndarray | None  # int64 [N], each in [0, Tv]
    ids: list[str]  # [N]
    zeroed_neg_inf: int = 0
    """How many -inf feature values were replaced by 0 on load (the official loaders do this)."""

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class MMSAData:
    """The three validated splits of one MMSA dataset file."""

    train: MMSASplit
    valid: MMSASplit
    test: MMSASplit
    dataset: str
    source: str

    @property
    def aligned(self) -> bool:
        """True when audio and vision share the time axis: equal sequence lengths and
        equal (or absent) per-sample lengths. MOSEI's unaligned files also have
        Ta = Tv = 500, but their per-sample lengths differ."""
        for s in (self.train, self.valid, self.test):
            if s.audio.shape[1] != s.vision.shape[1]:
                return False
            a, v = s.audio_lengths, s.vision_lengths
            if (a is None) != (v is None) or (a is not None and not np.array_equal(a, v)):
                return False
        return True

    @property
    def feature_dims(self) -> tuple[int, int]:
        """(Da, Dv): audio and vision feature widths."""
        return self.train.audio.shape[2], self.train.vision.shape[2]

    def split(self, name: str) -> MMSASplit:
        """Return the split called 'train', 'valid' or 'test'."""
        if name not in SPLITS:
            raise DataError(f"split: expected one of {list(SPLITS)}, found {name!r}")
        return getattr(self, name)


def load_mmsa(
    path: str | os.PathLike, dataset: str, audio_dim: int | None = None, vision_dim: int | None = None,
    require_labels: bool = True,
) -> MMSAData:
    """Read and validate an MMSA `.pkl` (trusted sources only) or a converted `.npz`.

    The format is recognised from the file's content, not its name. `audio_dim` and
    `vision_dim` are the expected feature widths Da, Dv (None: the dataset's standard
    MMSA widths). `require_labels=False` reads new, unlabeled samples (see the module
    docstring). Any structural or value problem raises `DataError` naming the file,
    split, field, what was expected and what was found. Reads only; writes nothing.
    """
    path = Path(path)
    check_data_file(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    raw = _read_npz(path) if magic == _ZIP_MAGIC else _read_pickle(path)
    return from_mmsa_dict(raw, dataset, str(path), audio_dim, vision_dim, require_labels)


def from_mmsa_dict(
    raw: Any,
    dataset: str,
    source: str = "<memory>",
    audio_dim: int | None = None,
    vision_dim: int | None = None,
    require_labels: bool = True,
) -> MMSAData:
    """Validate an in-memory MMSA dict (the unpickled content of an MMSA file).

    Same checks as `load_mmsa`; `source` names the data in error messages. The input
    arrays are not modified.
    """
    spec = dataset_spec(dataset)
    dims = spec.widths(audio_dim, vision_dim)
    if not isinstance(raw, dict):
        raise DataError(f"{source}: expected a dict with keys {list(SPLITS)}, found {type(raw).__name__}")
    present = [name for name in SPLITS if name in raw]
    if not present or (require_labels and len(present) < len(SPLITS)):
        missing = next(name for name in SPLITS if name not in raw)
        raise DataError(f"{source}: missing split {missing!r}; found keys {sorted(map(str, raw))}")
    parsed = {name: _parse_split(raw[name], f"{source} [{name}]", dims, spec.label_min, spec.label_max,
                                 require_labels) for name in present}
    splits = {name: parsed.get(name, parsed[present[0]]) for name in SPLITS}
    return MMSAData(dataset=spec.name, source=source, **splits)


def save_npz(data: MMSAData, path: str | os.PathLike) -> Path:
    """Write `data` to one `.npz` readable with `allow_pickle=False`, atomically."""
    meta = {"format": NPZ_FORMAT, "version": NPZ_VERSION, "dataset": data.dataset}
    arrays = {"meta": _json_bytes(meta)}
    for name in SPLITS:
        s = data.split(name)
        arrays[f"{name}.raw_text"] = _json_bytes(s.raw_text)
        arrays[f"{name}.id"] = _json_bytes(s.ids)
        arrays[f"{name}.audio"] = s.audio
        arrays[f"{name}.vision"] = s.vision
        arrays[f"{name}.labels"] = s.labels
        if s.audio_lengths is not None:
            arrays[f"{name}.audio_lengths"] = s.audio_lengths
        if s.vision_lengths is not None:
            arrays[f"{name}.vision_lengths"] = s.vision_lengths
    path = Path(path)
    write_npz(path, **arrays)
    return path


def convert_pickle(src_pkl: str | os.PathLike, dst_npz: str | os.PathLike, dataset: str) -> Path:
    """Load a trusted MMSA pickle, validate it and write it as a safe `.npz`."""
    return save_npz(load_mmsa(src_pkl, dataset), dst_npz)


def check_data_file(path: str | os.PathLike) -> None:
    """DataError unless `path` is a file (what a data file must be before it is read)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: expected a data file (an MMSA .pkl or a converted .npz), found a directory")
    if not path.is_file():
        raise DataError(f"{path}: data file not found (expected an MMSA .pkl or a converted .npz)")


# ---------------------------------------------------------------------------- readers


def _read_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as e:
        raise DataError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from e


def _read_npz(path: Path) -> dict[str, dict[str, Any]]:
    """Rebuild the MMSA dict layout from our `.npz` so both formats share one validator."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
    meta = _from_json_bytes(arrays.pop("meta", None), path, "meta")
    if not isinstance(meta, dict) or meta.get("format") != NPZ_FORMAT or meta.get("version") != NPZ_VERSION:
        raise DataError(f"{path}: meta: expected format {NPZ_FORMAT!r} version {NPZ_VERSION}, found {meta!r}")
    out: dict[str, dict[str, Any]] = {}
    rename = {"labels": "regression_labels"}
    for key, value in arrays.items():
        split, _, field = key.partition(".")
        if field in ("raw_text", "id"):
            value = _from_json_bytes(value, path, key)
        out.setdefault(split, {})[rename.get(field, field)] = value
    return out


def _json_bytes(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)


def _from_json_bytes(arr: np.ndarray | None, path: Path, key: str) -> Any:
    if arr is None:
        raise DataError(f"{path}: missing array {key!r}")
    try:
        return json.loads(arr.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: {key}: expected UTF-8 JSON bytes ({e})") from e


# ---------------------------------------------------------------------------- validation


def _parse_split(
    raw: Any, where: str, dims: tuple[int, int], label_min: float, label_max: float, require_labels: bool = True
) -> MMSASplit:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a dict of arrays, found {type(raw).__name__}")
    required = ("raw_text", "audio", "vision", "regression_labels", "id") if require_labels else (
        "raw_text", "audio", "vision", "id")
    for key in required:
        if key not in raw:
            raise DataError(f"{where}: missing key {key!r}; found keys {sorted(map(str, raw))}")

    audio, zeroed_a = _features(raw["audio"], where, "audio", dims[0])
    vision, zeroed_v = _features(raw["vision"], where, "vision", dims[1])
    n = audio.shape[0]
    if n == 0:
        raise DataError(f"{where}: audio: expected at least one sample, found shape {audio.shape}")
    if vision.shape[0] != n:
        raise DataError(f"{where}: vision: expected {n} samples like audio, found shape {vision.shape}")
    if "regression_labels" in raw:
        labels = _labels(raw["regression_labels"], where, n, label_min, label_max)
    else:  # only without require_labels: new samples to predict on
        labels = np.full(n, np.nan, dtype=np.float32)
    texts = _strings(raw["raw_text"], where, "raw_text", n)
    for i, t in enumerate(texts):
        if not t.strip():
            raise DataError(f"{where}: raw_text[{i}]: expected a non-empty transcript, found {t!r}")
    ids = _strings(raw["id"], where, "id", n)
    audio_lengths = _lengths(raw.get("audio_lengths"), where, "audio_lengths", n, audio.shape[1])
    vision_lengths = _lengths(raw.get("vision_lengths"), where, "vision_lengths", n, vision.shape[1])
    return MMSASplit(texts, audio, vision, labels, audio_lengths, vision_lengths, ids, zeroed_a + zeroed_v)


def _first_bad(bad: np.ndarray) -> int:
    """Index of the first sample with any True in `bad` [N, ...]."""
    return int(np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))[0])


def _features(x: Any, where: str, field: str, dim: int) -> tuple[np.ndarray, int]:
    """Validate a [N, T, D] feature array; replace -inf by 0 and count them."""
    try:
        x = np.asarray(x)
    except Exception as e:
        raise DataError(f"{where}: {field}: expected a float array [N, T, {dim}], found {type(x).__name__}") from e
    if x.ndim != 3:
        raise DataError(f"{where}: {field}: expected a 3-D array [N, T, {dim}], found shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{where}: {field}: expected a float array, found dtype {x.dtype}")
    if x.shape[2] != dim:
        raise DataError(
            f"{where}: {field}: expected feature dim {dim}, found shape {x.shape} "
            f"(another dataset's file? name it with --dataset or data.dataset; other widths: data.{field}_dim)"
        )
    x = x.astype(np.float32, copy=False)
    neg_inf = np.isneginf(x)
    zeroed = int(neg_inf.sum())
    if zeroed:
        x = np.where(neg_inf, np.float32(0), x)
    bad = ~np.isfinite(x)
    if bad.any():
        i = _first_bad(bad)
        found = x[i][bad[i]][0]
        raise DataError(f"{where}: {field}: expected finite values, found {found} in sample {i}")
    return x, zeroed


def _labels(y: Any, where: str, n: int, lo: float, hi: float) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,):
        raise DataError(f"{where}: regression_labels: expected shape ({n},) like audio, found {y.shape}")
    if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{where}: regression_labels: expected numbers, found dtype {y.dtype}")
    y32 = y.astype(np.float32)
    bad = ~np.isfinite(y32) | (y32 < lo) | (y32 > hi)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{where}: regression_labels: expected finite values in [{lo}, {hi}], found {y[i]!s} in sample {i}"
        )
    return y32


def _strings(x: Any, where: str, field: str, n: int) -> list[str]:
    if isinstance(x, (str, bytes)) or not hasattr(x, "__len__"):
        raise DataError(f"{where}: {field}: expected a sequence of {n} strings, found {type(x).__name__}")
    if len(x) != n:
        raise DataError(f"{where}: {field}: expected {n} entries like audio, found {len(x)}")
    out = []
    for i, s in enumerate(x):
        if not isinstance(s, str):
            raise DataError(f"{where}: {field}[{i}]: expected a string, found {type(s).__name__} {s!r}")
        out.append(str(s))
    return out


def _lengths(x: Any, where: str, field: str, n: int, t: int) -> np.ndarray | None:
    if x is None:
        return None
    x = np.asarray(x)
    if x.shape != (n,):
        raise DataError(f"{where}: {field}: expected shape ({n},) like audio, found {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{where}: {field}: expected integers, found dtype {x.dtype}")
    bad = (x < 0) | (x > t)
    if x.dtype.kind == "f":
        bad |= ~np.isfinite(x) | (x != np.round(x))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{where}: {field}: expected integers in [0, {t}] (the sequence length), found {x[i]} in sample {i}"
        )
    return x.astype(np.int64)
