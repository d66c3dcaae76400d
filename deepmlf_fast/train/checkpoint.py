"""Checkpoints: trained weights in safetensors, resume points next to them, all atomic and durable.

A resume point is a directory (where, `train.rundir.RunDir` says) holding `model.safetensors`,
`optimizer.pt` (engine state and every RNG) and `state.json` (where the stage stands, a
`TrainState`), replaced as a whole by `fileio.atomic_dir`; `open_resume_point` repairs what a kill
in the middle of a replacement left. Every damaged file raises a `CheckpointError` that names it.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deepmlf_fast.errors import CheckpointError
from deepmlf_fast.fileio import atomic_dir, atomic_path, read_json, recover_dir

FORMAT = "deepmlf-fast/1"


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict to safetensors atomically (tensors copied to contiguous CPU)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict; CheckpointError naming the file when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is damaged (truncated or not safetensors): {e}") from None


def _load_torch(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{what} {str(path)!r} is damaged (truncated or not a torch file): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def is_new_best(value: float, best: float, has_best: bool) -> bool:
    """Whether an epoch whose validation value is `value` becomes the best so far.

    It must beat `best` by more than 1e-6 (the official trainer's test). A non-finite value
    (NaN, inf) never beats anything, but the first such epoch is kept while no epoch has a
    best at all (`has_best` False), so the best checkpoint always exists; its recorded value
    stays +inf, so any later finite value replaces it.
    """
    if not math.isfinite(value):
        return not has_best
    return value < best - 1e-6


@dataclass
class TrainState:
    """Where a training stage stands after an epoch."""

    epoch: int = 0
    """Epochs completed."""
    best_metric: float = float("inf")
    """The best epoch's validation key metric (+inf while no epoch had a finite one)."""
    best_epoch: int = -1
    """0-based; -1 before the first epoch."""
    history: list[dict] = field(default_factory=list)
    """One entry per completed epoch (`train.loop.fit`)."""


def rng_state() -> dict:
    """Every RNG's state as tensors and plain lists (loadable with `weights_only=True`)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), py_gauss],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))


def save_resume(folder: str | Path, model_state: dict, engine_state: dict, state: TrainState) -> None:
    """Write a complete resume point into `folder` (weights, engine state, RNG, `state` as
    JSON), replacing the previous one atomically and durably."""
    with atomic_dir(folder) as tmp:
        save_weights(model_state, tmp / "model.safetensors")
        torch.save({"engine": engine_state, "rng": rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))


def open_resume_point(folder: str | Path) -> tuple[bool, str | None]:
    """Repair an interrupted replacement of `folder`; -> (a complete resume point exists, what
    was repaired or None)."""
    folder = Path(folder)
    repaired = recover_dir(folder)
    return folder.is_dir(), repaired


def read_state(folder: str | Path) -> TrainState:
    """The `TrainState` of a resume point; CheckpointError naming `state.json` when it is missing
    or damaged."""
    path = Path(folder) / "state.json"
    raw = read_json(path, "resume state", CheckpointError)
    try:
        return TrainState(**raw)
    except TypeError as e:
        raise CheckpointError(f"resume state {str(path)!r} is damaged: {e}") from None


def load_resume(folder: str | Path) -> tuple[dict, dict, dict, TrainState]:
    """-> (model state, engine state, rng state, `TrainState`) of a resume point."""
    folder = Path(folder)
    for name in ("model.safetensors", "optimizer.pt", "state.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"resume point {str(folder)!r} is incomplete: {name} is missing")
    extra = _load_torch(folder / "optimizer.pt", "optimizer state")
    if not isinstance(extra, dict) or not {"engine", "rng"} <= set(extra):
        raise CheckpointError(f"optimizer state {str(folder / 'optimizer.pt')!r} is damaged: expected engine and rng "
                              f"entries, found {sorted(extra) if isinstance(extra, dict) else type(extra).__name__}")
    return load_weights(folder / "model.safetensors"), extra["engine"], extra["rng"], read_state(folder)
