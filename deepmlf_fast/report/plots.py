"""The report's and the sweep's figures (matplotlib, headless).

Figures are built as `matplotlib.figure.Figure` objects without pyplot, so nothing here
opens a window, selects a GUI backend or keeps global figure state: `save_png` renders
through the Agg canvas. Every function returns the figure; the data it plots stays readable
from its artists (tests count the points of a curve).

Histories are `{seed: [history entry, ...]}` with the entries `train.loop.fit` records.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from deepmlf_fast.data.specs import dataset_spec
from deepmlf_fast.fileio import atomic_path
from deepmlf_fast.report.classes import class_names, sentiment_classes

LOSS_TERMS = ("task", "fusion", "av", "text", "clm", "total")
"""Stage-2 loss terms in the order they are drawn (`clm` only when the run had it)."""

VALID_COUNTERPART = {"task": "MAE", "fusion": "MAE_fusion", "av": "MAE_av", "text": "MAE_text"}
"""The validation metric drawn next to a training L1 term: the same head's mean absolute error
(for `fusion`, of the mean over fusion tokens rather than the mean of each token's error)."""


def save_png(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Render `fig` to a PNG at `path` (Agg canvas; parents created; written atomically)."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def scatter_figure(pred: np.ndarray, labels: np.ndarray, dataset: str, title: str) -> Figure:
    """Predicted vs true score `(N,)` each, with the identity line over the label range."""
    spec = dataset_spec(dataset)
    fig = Figure(figsize=(4.6, 4.4), layout="constrained")
    ax = fig.add_subplot()
    lo, hi = spec.label_min, spec.label_max
    ax.plot([lo, hi], [lo, hi], color="0.4", lw=1, ls="--", label="identity")
    ax.scatter(labels, pred, s=10, alpha=0.6, color="tab:blue", edgecolors="none", label="test samples")
    pad = 0.05 * (hi - lo)
    low = min(lo, float(np.min(pred))) - pad
    high = max(hi, float(np.max(pred))) + pad
    ax.set(xlim=(lo - pad, hi + pad), ylim=(low, high), xlabel="true score", ylabel="predicted score", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return fig


def confusion_figure(pred: np.ndarray, labels: np.ndarray, dataset: str, title: str) -> Figure:
    """Counts of (true class, predicted class) over the 7 (MOSI, MOSEI) or 5 (SIMS) sentiment
    classes of `report.classes`; rows true, columns predicted, each cell annotated."""
    names = class_names(dataset)
    matrix = confusion_matrix(pred, labels, dataset)
    fig = Figure(figsize=(6.2, 5.4), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8, label="samples")
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    top = matrix.max() if matrix.size else 0
    for r in range(len(names)):
        for c in range(len(names)):
            ax.text(c, r, str(matrix[r, c]), ha="center", va="center", fontsize=8,
                    color="white" if matrix[r, c] > top / 2 else "black")
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    return fig


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, dataset: str) -> np.ndarray:
    """`(C, C)` int counts, row = true class, column = predicted class."""
    n = len(class_names(dataset))
    t, p = sentiment_classes(labels, dataset), sentiment_classes(pred, dataset)
    keep = (t >= 0) & (p >= 0)
    return np.bincount(t[keep] * n + p[keep], minlength=n * n).reshape(n, n)


def curves_figure(histories: dict[str, list[dict]], title: str) -> Figure:
    """One panel per stage-2 loss term: the training mean per epoch (solid) and, for the L1
    terms, the validation MAE of the same head (dashed), one colour per seed."""
    terms = [t for t in LOSS_TERMS if any(t in e["train"] for h in histories.values() for e in h)]
    cols = 3
    rows = -(-len(terms) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, term in zip(axes, terms):
        for k, (seed, history) in enumerate(histories.items()):
            colour = f"C{k}"
            epochs = [e["epoch"] for e in history if term in e["train"]]
            ax.plot(epochs, [e["train"][term] for e in history if term in e["train"]], color=colour, marker=".",
                    label=f"train, seed {seed}")
            key = VALID_COUNTERPART.get(term)
            if key is not None:
                ax.plot([e["epoch"] for e in history], [_num(e["valid"].get(key)) for e in history], color=colour,
                        ls="--", marker=".", label=f"valid {key}, seed {seed}")
        ax.set(title=term, xlabel="epoch", ylabel="L1" if term in VALID_COUNTERPART else "loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(terms):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def lr_figure(histories: dict[str, list[dict]], title: str) -> Figure:
    """The learning rate at the end of every epoch, one line per seed (log scale)."""
    fig = Figure(figsize=(5.0, 3.2), layout="constrained")
    ax = fig.add_subplot()
    for k, (seed, history) in enumerate(histories.items()):
        ax.plot([e["epoch"] for e in history], [e["lr"] for e in history], marker=".", color=f"C{k}",
                label=f"seed {seed}")
    ax.set(xlabel="epoch", ylabel="learning rate", title=title, yscale="log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def gates_figure(histories: dict[str, list[dict]], title: str) -> Figure:
    """Gate values of every MM block after each epoch: attention gate (left) and FFN gate
    (right); one line per (block, seed), one point per epoch. Lines are labelled
    `block <i>, seed <s>`."""
    fig = Figure(figsize=(10.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    blocks = sorted({b for h in histories.values() for e in h for b in e["gates"]}, key=int)
    styles = ("-", "--", ":", "-.")
    for ax, half, name in zip(axes, ("attn", "ffn"), ("cross-attention gate", "FFN gate")):
        for s, (seed, history) in enumerate(histories.items()):
            for b, block in enumerate(blocks):
                points = [(e["epoch"], e["gates"][block][half]) for e in history if block in e["gates"]]
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, color=f"C{b}",
                        ls=styles[s % len(styles)], label=f"block {block}, seed {seed}")
        ax.set(xlabel="epoch", ylabel="gate value", title=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    return fig


def attention_figure(maps: dict, labels: np.ndarray, title: str) -> Figure:
    """Fusion-token attention over AV time, mean over heads: one row per sample, one column
    per MM block (`report.attention.attention_maps`' output); AV steps past a sample's length
    are left blank. `labels (S,)` the samples' true scores, shown in the row titles."""
    blocks = sorted(maps["probs"], key=int)
    n_samples = len(maps["index"])
    fig = Figure(figsize=(2.6 * len(blocks) + 1.0, 1.9 * n_samples + 0.6), layout="constrained")
    axes = fig.subplots(n_samples, len(blocks), squeeze=False)
    top = max(float(maps["probs"][b].max()) for b in blocks)
    image = None
    for r in range(n_samples):
        valid = maps["valid"][r]
        for c, block in enumerate(blocks):
            ax = axes[r, c]
            shown = np.where(valid[None, :], maps["probs"][block][r], np.nan)
            image = ax.imshow(shown, aspect="auto", cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
            if r == 0:
                ax.set_title(f"MM block after LM block {block}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"sample {int(maps['index'][r])}\ny={labels[r]:+.2f}\nfusion token", fontsize=7)
            if r == n_samples - 1:
                ax.set_xlabel("AV step", fontsize=8)
            ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention (mean over heads)")
    fig.suptitle(title)
    return fig


def ablation_figure(points: list[dict], x_label: str, metrics: tuple[str, ...], title: str) -> Figure:
    """Metric vs one grid axis, mean ± std over seeds as error bars.

    `points`: `{"x": position, "tick": label, "series": name of the other axes' values (one
    line each), "mean": {metric: v}, "std": {metric: v}}`; x positions are the axis values
    when numeric, else their order."""
    fig = Figure(figsize=(3.6 * len(metrics), 3.4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    series = list(dict.fromkeys(p["series"] for p in points))
    ticks = sorted({(p["x"], p["tick"]) for p in points})
    for ax, metric in zip(axes, metrics):
        for k, name in enumerate(series):
            pts = sorted((p for p in points if p["series"] == name), key=lambda p: p["x"])
            ax.errorbar([p["x"] for p in pts], [_num(p["mean"].get(metric)) for p in pts],
                        yerr=[_num(p["std"].get(metric)) for p in pts], marker="o", capsize=4, color=f"C{k}",
                        label=name or None)
        ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks])
        ax.set(xlabel=x_label, ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
        if any(series):
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def _num(v) -> float:
    """A metric value for plotting: None (a NaN saved as JSON null) becomes NaN."""
    return float("nan") if v is None else float(v)
