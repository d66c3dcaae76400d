"""Checkpoints: trained weights in safetensors, resume state next to them, all atomic.

Run directory layout (one folder per seed):

    DIR/config.json                      the RunConfig (rebuilds the model around the backbone)
    DIR/results.json                     test metrics (mean over seeds) and per-seed details
    DIR/seed_<s>/av_encoder.safetensors  stage-1 AV encoder
    DIR/seed_<s>/best.safetensors        best stage-2 weights (only what DeepMLF trains)
    DIR/seed_<s>/last/                   resume point: model.safetensors, optimizer.pt, state.json
    DIR/seed_<s>/result.json             this seed's test/valid metrics
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from deepmlf_fast.errors import CheckpointError
from deepmlf_fast.fileio import atomic_dir, atomic_path

FORMAT = "deepmlf-fast/1"


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict to safetensors atomically (tensors copied to contiguous CPU)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict, with a clear error when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    return load_file(str(path))


@dataclass
class TrainState:
    """Where a stage-2 run stands after an epoch."""

    epoch: int = 0
    """Epochs completed."""
    best_metric: float = float("inf")
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)


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
    """Write a complete resume point into `folder`, replacing the previous one atomically."""
    with atomic_dir(folder) as tmp:
        save_weights(model_state, tmp / "model.safetensors")
        torch.save({"engine": engine_state, "rng": rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))


def load_resume(folder: str | Path) -> tuple[dict, dict, dict, TrainState]:
    """-> (model state, engine state, rng state, TrainState) of a resume point."""
    folder = Path(folder)
    for name in ("model.safetensors", "optimizer.pt", "state.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"resume point {str(folder)!r} is incomplete: {name} is missing")
    extra = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    state = TrainState(**json.loads((folder / "state.json").read_text()))
    return load_weights(folder / "model.safetensors"), extra["engine"], extra["rng"], state
