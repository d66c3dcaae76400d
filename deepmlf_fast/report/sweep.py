"""The summary of a `deepmlf sweep` (the driver is `train.sweep.run_sweep`): test metrics of
every finished cell, straight from each cell's `results.json`, and the ablation plots.

    SWEEP_DIR/summary.md/.json  test metrics of every finished cell (mean ± std over seeds)
    SWEEP_DIR/ablation_<field>.png   metric vs each grid field, error bars = std over seeds
"""

from __future__ import annotations

import logging
from pathlib import Path

from deepmlf_fast.data.specs import dataset_spec
from deepmlf_fast.errors import CheckpointError
from deepmlf_fast.fileio import read_json, write_json, write_text_atomic
from deepmlf_fast.report.writer import HEAD_KEYS
from deepmlf_fast.train.rundir import RunDir
from deepmlf_fast.train.sweep import Axis, Cell, safe_name

log = logging.getLogger(__name__)

ABLATION_METRICS = {
    "mosi": ("MAE", "Corr", "Non0_acc_2", "Mult_acc_7"),
    "sims": ("MAE", "Corr", "Mult_acc_2", "Mult_acc_5"),
}
"""Panels of the ablation plots, per label scale (`DatasetSpec.scale`; the paper's ablation columns)."""


def write_summary(sweep_dir: Path, axes: list[Axis], cells: list[Cell]) -> dict:
    """summary.json / summary.md (one row per finished cell: its values, then every test
    metric's mean ± std over seeds, straight from the cell's results.json) and, when
    matplotlib is installed, one ablation plot per grid field."""
    from deepmlf_fast.report import matplotlib_available

    rows = []
    for cell in cells:
        path = RunDir(cell.cfg.train.output_dir).results
        if not path.is_file():
            continue
        r = read_json(path, "cell results", CheckpointError)
        names = r["metric_names"] + list(HEAD_KEYS)
        rows.append({"cell": cell.name, "values": cell.texts, "dataset": r["dataset"], "seeds": r["seeds"],
                     "mean": {k: r.get(k) for k in names}, "std": {k: r["std"].get(k) for k in names}})
    summary = {"axes": [a.record() for a in axes], "cells": rows}
    write_json(sweep_dir / "summary.json", summary)
    metrics = list(dict.fromkeys(k for row in rows for k in row["mean"]))
    header = ["cell", *(a.name for a in axes), *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells_md = [row["values"][a.name] for a in axes] + [_cell(row, k) for k in metrics]
        lines.append("| " + " | ".join([f"`{row['cell']}`", *cells_md]) + " |")
    text = [f"# Sweep {sweep_dir.name}", "", f"{len(rows)} of {len(cells)} cells finished; test metrics, mean ± std "
            f"over seeds (each cell's `results.json`).", "", *lines, ""]
    if rows and matplotlib_available():
        for a in axes:
            png = ablation_plot(sweep_dir, a, axes, rows)
            text += [f"![metric vs {a.name}]({png.name})", ""]
    write_text_atomic(sweep_dir / "summary.md", "\n".join(text))
    log.info("sweep summary: %s", sweep_dir / "summary.md")
    return summary


def _cell(row: dict, key: str) -> str:
    mean, std = row["mean"].get(key), row["std"].get(key)
    return "—" if mean is None else f"{mean:.4f} ± {std:.4f}"


def ablation_plot(sweep_dir: Path, axis: Axis, axes: list[Axis], rows: list[dict]) -> Path:
    """`SWEEP_DIR/ablation_<axis>.png`: each ablation metric vs `axis`, one line per value of
    the other grid fields, error bars = std over seeds."""
    from deepmlf_fast.report.plots import ablation_figure, save_png

    others = [a for a in axes if a is not axis]
    at = {text: i for i, text in enumerate(axis.texts)}
    points = [{"x": axis.x[at[row["values"][axis.name]]], "tick": axis.ticks[at[row["values"][axis.name]]],
               "series": ", ".join(f"{o.name}={row['values'][o.name]}" for o in others),
               "mean": row["mean"], "std": row["std"]} for row in rows]
    metrics = ABLATION_METRICS[dataset_spec(rows[0]["dataset"]).scale]
    x_label = "MM blocks (depth:k)" if axis.depth else axis.name
    fig = ablation_figure(points, x_label, metrics, f"{sweep_dir.name}: test metrics vs {axis.name} "
                                                    f"(mean ± std over seeds)")
    return save_png(fig, sweep_dir / f"ablation_{safe_name(axis.name)}.png")
