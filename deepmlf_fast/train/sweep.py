"""The sweep driver of `deepmlf sweep`: a grid over configuration fields x seeds, one run after another.

    deepmlf sweep --grid fusion.n_tokens=4,8,12,20 --grid fusion.mm_layers=depth:1,3,5,7 [train flags]

Every cell is one ordinary run: its RunConfig is the `deepmlf train` flags' configuration
(built by `cli.run_config_from_args`) with the cell's values applied by `apply_overrides`,
trained by `train.run.train_run` (every seed of `train.seeds`) into `SWEEP_DIR/<cell>/`; so
DeepSpeed, parity, resume and every other flag work inside a sweep as they do outside.

Grid syntax (`--grid PATH=VALUES`, repeatable; PATH a dotted field as in `--set`):
    scalar fields        comma-separated values:           fusion.n_tokens=4,8,12
    tuple fields         semicolon-separated tuples:       'fusion.mm_layers=3,5;5,7;7'
    fusion.mm_layers     depth:K1,K2,...                   fusion.mm_layers=depth:1,3,5
`depth:k` places k MM blocks at evenly spaced depths, from the recipe's first MM block s
(the smallest index of the base configuration's `fusion.mm_layers`, already adapted to the
backbone) to the last LM block N-1, both included: block j (j = 0..k-1) follows LM block
`s + round(j * (N-1-s) / (k-1))` (halves rounded up); `depth:1` is the last LM block alone.
k may be at most N - s. With the demo recipe (SmolLM2-135M, N = 30, s = 14) depth:5 gives
14, 18, 22, 25, 29.

Every cell is built and validated (`train.run.check_run`, and against a run already in its
folder) before anything trains, so an unknown field or a bad value fails at once with a
ConfigError naming it. A cell whose `results.json` exists is skipped, so an interrupted
sweep resumes where it stopped (an unfinished cell continues from its last epoch, as
`deepmlf train` does).

    SWEEP_DIR/sweep.json        the grid and every cell's values
    SWEEP_DIR/<cell>/           one run directory per cell

The summary of the finished cells (summary.md/.json, ablation plots) is `report.sweep`'s,
which the CLI writes after `run_sweep`.
"""

from __future__ import annotations

import itertools
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from deepmlf_fast.backbones.load import backbone_config
from deepmlf_fast.config import RunConfig, apply_overrides, field_path, parse_value
from deepmlf_fast.errors import ConfigError
from deepmlf_fast.fileio import check_output, write_json
from deepmlf_fast.train import distributed, run
from deepmlf_fast.train.rundir import RunDir

log = logging.getLogger(__name__)

MM_LAYERS = "model.fusion.mm_layers"


@dataclass
class Axis:
    """One grid field: its full dotted `path`, its `name` in cell names, and its values as
    named in cell names (`texts`), as set (`values`) and as plotted (`x`: the number of MM
    blocks for depth:k, the value for numeric fields, else the position; `ticks` their labels);
    `depth`: the values were given as depth:k."""

    path: str
    name: str
    texts: list[str]
    values: list[Any]
    x: list[float]
    ticks: list[str]
    depth: bool

    def record(self) -> dict:
        """The field as sweep.json and summary.json list it: path, name, values as named in cells."""
        return {"path": self.path, "name": self.name, "values": self.texts}


@dataclass
class Cell:
    """One grid point: folder name, the values it sets per axis, its full configuration."""

    name: str
    texts: dict[str, str]
    cfg: RunConfig


@dataclass
class Sweep:
    """A sweep's grid fields and its cells, in training order (the first axis varies slowest)."""

    axes: list[Axis]
    cells: list[Cell]


def parse_grid(items: Sequence[str], base: RunConfig) -> list[Axis]:
    """Parse `--grid PATH=VALUES` items against the base configuration (see the module
    docstring); ConfigError naming the field for an unknown field or a bad value."""
    if not items:
        raise ConfigError("--grid: expected at least one PATH=VALUES, like --grid fusion.n_tokens=4,8")
    axes: list[Axis] = []
    for item in items:
        path, sep, text = item.partition("=")
        if not sep or not text.strip():
            raise ConfigError(f"--grid: expected PATH=VALUES like fusion.n_tokens=4,8, found {item!r}")
        full = field_path(path.strip())
        if full in ("train.output_dir", "train.seeds"):
            raise ConfigError(f"--grid {path.strip()}: the sweep sets it (cells go to SWEEP_DIR/<cell>; every cell "
                              f"runs every seed of --seeds)")
        if any(a.path == full for a in axes):
            raise ConfigError(f"--grid {path.strip()}: given twice")
        text = text.strip()
        if text.startswith("depth:"):
            if full != MM_LAYERS:
                raise ConfigError(f"--grid {path.strip()}: depth:K applies to fusion.mm_layers only")
            counts = [_depth_count(t, path.strip()) for t in text[len("depth:"):].split(",")]
            texts = [f"depth{k}" for k in counts]
            values = [depth_layers(base, k) for k in counts]
            x, ticks = [float(k) for k in counts], [str(k) for k in counts]
        else:
            is_tuple = isinstance(_get(base, full), tuple)
            texts = [t.strip() for t in text.split(";" if is_tuple else ",")]
            if any(not t for t in texts):
                raise ConfigError(f"--grid {path.strip()}: empty value in {text!r}")
            values = [parse_value(full, t) for t in texts]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            x = [float(v) for v in values] if numeric else [float(i) for i in range(len(values))]
            texts = ["-".join(map(str, v)) if isinstance(v, tuple) else t for t, v in zip(texts, values)]
            ticks = texts
        if len(set(texts)) != len(texts):
            raise ConfigError(f"--grid {path.strip()}: repeated value in {text!r}")
        axes.append(Axis(full, "", texts, values, x, ticks, text.startswith("depth:")))
    leaves = [a.path.rsplit(".", 1)[-1] for a in axes]
    for a, leaf in zip(axes, leaves):  # the field's own name, or its whole path where two share it
        a.name = leaf if leaves.count(leaf) == 1 else a.path.removeprefix("model.")
    return axes


def _depth_count(text: str, path: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise ConfigError(f"--grid {path}: depth:K expects integers >= 1 like depth:1,3,5, found {text!r}") from None
    if k < 1:
        raise ConfigError(f"--grid {path}: depth:K expects integers >= 1, found {k}")
    return k


def depth_layers(base: RunConfig, k: int) -> tuple[int, ...]:
    """The LM blocks followed by an MM block for `depth:k` on `base`'s backbone (see the module
    docstring): k evenly spaced from the base's first MM block to the last LM block."""
    n_layers = backbone_config(base.model.backbone).num_hidden_layers
    first = min(base.model.fusion.mm_layers) if base.model.fusion.mm_layers else 0
    span = n_layers - 1 - first
    if k > span + 1:
        raise ConfigError(f"fusion.mm_layers: depth:{k} needs {k} distinct LM blocks from the recipe's first MM "
                          f"block {first} to the last LM block {n_layers - 1}, found {span + 1}")
    if k == 1:
        return (n_layers - 1,)
    return tuple(first + (2 * span * j + (k - 1)) // (2 * (k - 1)) for j in range(k))


def _get(cfg: RunConfig, path: str):
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def sweep_cells(base: RunConfig, axes: list[Axis], sweep_dir: Path) -> list[Cell]:
    """Every grid point (the first axis varies slowest), each with its configuration."""
    cells = []
    for combo in itertools.product(*(range(len(a.values)) for a in axes)):
        texts = {a.name: a.texts[i] for a, i in zip(axes, combo)}
        name = "__".join(f"{k}={safe_name(v)}" for k, v in texts.items())
        overrides = {a.path: a.values[i] for a, i in zip(axes, combo)}
        overrides["train.output_dir"] = str(sweep_dir / name)
        cells.append(Cell(name, texts, apply_overrides(base, overrides)))
    return cells


def safe_name(text: str) -> str:
    """A value as a folder-name part: letters, digits, '.', '-', '+'; anything else '_'."""
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def run_sweep(base: RunConfig, grid: Sequence[str], sweep_dir: str | Path, *, resume: bool = False,
              overwrite: bool = False) -> Sweep:
    """Validate every cell, then train the unfinished ones in order; -> the grid and its cells
    (`report.sweep.write_summary` summarises them). `resume`: cells continue with changed
    training settings (`deepmlf train --resume`); `overwrite`: the sweep folder is emptied first."""
    sweep_dir = Path(sweep_dir)
    axes = parse_grid(grid, base)
    check_output(sweep_dir, "sweep directory", ConfigError, directory=True)
    cells = sweep_cells(base, axes, sweep_dir)
    for cell in cells:  # everything is checked before the first cell trains
        try:
            run.check_run(cell.cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep cell {cell.name}: {e}") from None
        if not overwrite:
            RunDir(cell.cfg.train.output_dir).check_compatible(cell.cfg, resume, False)
    if distributed.is_main():
        if overwrite and sweep_dir.exists():
            shutil.rmtree(sweep_dir)
        write_json(sweep_dir / "sweep.json", {
            "grid": list(grid), "axes": [a.record() for a in axes],
            "cells": {c.name: c.texts for c in cells},
        })
    log.info("sweep %s: %d cells x %d seeds", sweep_dir, len(cells), len(base.train.seeds))
    for n, cell in enumerate(cells, 1):
        if distributed.from_main(RunDir(cell.cfg.train.output_dir).results.is_file()):
            log.info("sweep cell %d/%d %s: finished, skipped", n, len(cells), cell.name)
            continue
        log.info("sweep cell %d/%d %s", n, len(cells), cell.name)
        run.train_run(cell.cfg, resume=resume)
    return Sweep(axes, cells)
