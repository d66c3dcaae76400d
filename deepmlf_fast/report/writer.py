"""`deepmlf report`: one Markdown + HTML report of one or several finished runs.

    OUT/report.md      metric table (runs side by side), per-run plots, configuration,
                       hardware, versions, wall time
    OUT/report.html    the same, self-contained (images embedded)
    OUT/report/        the PNGs (one subfolder per run when there are several),
                       attention.npz (the attention maps drawn) and predictions.npz (the
                       test predictions drawn: `index`, `pred`, `labels`), per run

OUT is the run directory for one run, and the first run's parent for several (or `out`).

Numbers come from the run's files: the table from `results.json` (mean ± std over seeds),
the curves and gates from each seed's history (`seed_<s>/last/state.json`, written every
epoch by `train.loop.fit`). Sample-level plots (scatter, confusion matrix, attention maps)
need predictions: the run's model is rebuilt with `load_run` (best weights of one seed,
the first unless `seed`) and run on the test split. At the end of `deepmlf train` the report
draws instead the test predictions the run has just scored (`Session.test_predictions`), for a
seed trained in that process (a seed finished before a `--resume` is predicted again).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from deepmlf_fast.config import RunConfig
from deepmlf_fast.data.mmsa import check_data_file
from deepmlf_fast.errors import CheckpointError, ConfigError, DataError
from deepmlf_fast.fileio import check_output, read_json, write_npz, write_text_atomic
from deepmlf_fast.report.document import Doc
from deepmlf_fast.train.rundir import RunDir

log = logging.getLogger(__name__)

VERSIONS = ("deepmlf-fast", "torch", "triton", "transformers", "deepspeed", "bitsandbytes", "peft", "numpy",
            "safetensors", "tokenizers", "matplotlib", "tensorboard")
"""Distributions whose versions the report lists (read from metadata: importing some of them,
bitsandbytes for one, is slow and noisy)."""

HEAD_KEYS = ("MAE_text", "MAE_av", "MAE_fusion")
"""Single-modality heads' test MAE, shown under the MMSA metrics."""


@dataclass
class RunFiles:
    """What a finished run directory holds, read once."""

    root: Path
    config: dict
    """config.json as written (with `resolved`)."""
    cfg: RunConfig
    results: dict
    seconds: float | None
    """timing.json's wall time of the last invocation (None when absent)."""
    histories: dict[str, list[dict]]
    """`{seed: stage-2 history}`, seeds as strings in `results.json`'s order."""


def read_run(run_dir: str | Path) -> RunFiles:
    """Read a finished run (CheckpointError naming what is missing or damaged)."""
    rd = RunDir(run_dir)
    cfg = rd.read_config()
    if not rd.results.is_file():
        raise CheckpointError(f"{str(rd.root)!r} has no results.json: the run has not finished (resume it with "
                              f"`deepmlf train --output-dir {rd.root}`)")
    results = read_json(rd.results, "run results", CheckpointError)
    timing = read_json(rd.timing, "run timing", CheckpointError) if rd.timing.is_file() else {}
    histories = {str(seed): rd.read_history(seed) for seed in results["seeds"]}
    return RunFiles(rd.root, read_json(rd.config, "run configuration", CheckpointError), cfg, results, timing.get("seconds"),
                    histories)


def metric_table(runs: Sequence[RunFiles], labels: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Rows = MMSA metrics (every run's dataset's, in order) then the single-head MAEs;
    columns = runs; cells `mean ± std` over seeds with 4 decimals, straight from results.json
    (`—` where a run has no such metric or it is undefined)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.results["metric_names"]))
    keys += list(HEAD_KEYS)
    rows = [[key] + [_mean_std(r.results, key) for r in runs] for key in keys]
    rows.append(["seeds"] + [str(len(r.results["seeds"])) for r in runs])
    return ["metric", *labels], rows


def _mean_std(results: dict, key: str) -> str:
    mean, std = results.get(key), results.get("std", {}).get(key)
    if mean is None:
        return "—"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None, *, seed: int | None = None,
                 n_attention: int = 4, device: str = "auto", session=None) -> Path:
    """Write report.md, report.html and the PNGs for finished runs; -> report.md's path.

    `out`: destination folder (default: the run for one run, the first run's parent for
    several); `seed`: whose model draws the sample-level plots (default each run's first);
    `n_attention`: test samples in the attention figure; `device`: where the model runs;
    `session`: for one run just trained, the `train.run.Session` that trained it (its backbone
    and data are reused, on its device)."""
    runs = [read_run(d) for d in run_dirs]  # every input checked before anything is loaded or written
    for r in runs:
        if seed is not None and str(seed) not in r.histories:
            raise CheckpointError(f"{str(r.root)!r} has no seed {seed}; its seeds are {r.results['seeds']}")
    if session is None:  # what rebuilding each run's model needs
        from deepmlf_fast.hardware import resolve_device

        resolve_device(device, "--device")
        for r in runs:
            if r.cfg.data.path is not None:
                try:
                    check_data_file(r.cfg.data.path)
                except DataError as e:
                    raise DataError(f"run {str(r.root)!r}: {e}") from None
    field = "--out" if out is not None else "--out (default: the run's folder; give --out elsewhere)"
    out = Path(out) if out is not None else runs[0].root if len(runs) == 1 else runs[0].root.parent
    check_output(out, field, ConfigError, directory=True)
    labels = run_labels([r.root for r in runs])
    doc = Doc()
    doc.heading(1, "DeepMLF report" + (f": {labels[0]}" if len(runs) == 1 else ""))
    doc.paragraph("Runs: " + ", ".join(f"`{lab}` ({r.root})" for lab, r in zip(labels, runs)))
    doc.heading(2, "Test metrics")
    doc.paragraph("MMSA's metrics of the multimodal prediction on the test split, then the test MAE of each "
                  "single-modality head; mean ± std over seeds (from each run's `results.json`).")
    doc.table(*metric_table(runs, labels))
    for r, label in zip(runs, labels):
        files = out / "report" / (label if len(runs) > 1 else "")
        if len(runs) > 1:
            doc.heading(2, f"Run {label}")
        _run_sections(doc, r, label, files, seed, n_attention, device, session, level=2 if len(runs) == 1 else 3)
    title = "DeepMLF report: " + ", ".join(labels)
    write_text_atomic(out / "report.md", doc.markdown(out))
    write_text_atomic(out / "report.html", doc.html(title))
    log.info("report written: %s, %s", out / "report.md", out / "report.html")
    return out / "report.md"


def run_labels(roots: Sequence[Path]) -> list[str]:
    """Short unique names of run directories: the folder name, or more of the path when two
    runs share it."""
    for depth in range(1, max(len(r.resolve().parts) for r in roots) + 1):
        labels = ["-".join(r.resolve().parts[-depth:]) for r in roots]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}-{r.name}" for i, r in enumerate(roots)]  # the same directory given twice


def _run_sections(doc: Doc, run: RunFiles, label: str, files: Path, seed: int | None, n_attention: int,
                  device: str, session, level: int) -> None:
    from deepmlf_fast.report import plots
    from deepmlf_fast.report.classes import class_names

    files.mkdir(parents=True, exist_ok=True)
    dataset = run.cfg.data.dataset
    sample_seed = int(seed if seed is not None else run.results["seeds"][0])
    test = _test_outputs(run, sample_seed, n_attention, device, session)
    maps = test["attention"]
    write_npz(files / "attention.npz", index=maps["index"], valid=maps["valid"],
              **{f"block_{b}": p for b, p in maps["probs"].items()})
    write_npz(files / "predictions.npz", index=test["index"], pred=test["pred"], labels=test["labels"])

    doc.heading(level, "Predictions")
    doc.image(plots.save_png(plots.scatter_figure(test["pred"], test["labels"], dataset,
                                                  f"{label}: test, seed {sample_seed}"), files / "scatter.png"),
              f"Predicted vs true sentiment on the test split (seed {sample_seed}'s best model); dashed: identity.")
    n_classes = len(class_names(dataset))
    doc.image(plots.save_png(plots.confusion_figure(test["pred"], test["labels"], dataset,
                                                    f"{label}: {n_classes} classes, seed {sample_seed}"),
                             files / "confusion.png"),
              f"{n_classes}-class confusion matrix on the test split (classes as MMSA rounds scores, see "
              f"`deepmlf_fast/report/classes.py`).")

    histories = {s: h for s, h in run.histories.items() if h}
    doc.heading(level, "Training")
    if histories:
        doc.image(plots.save_png(plots.curves_figure(histories, label), files / "curves.png"),
                  "Stage-2 loss terms per epoch: training mean (solid) and the validation MAE of the same head "
                  "(dashed), per seed.")
        doc.image(plots.save_png(plots.lr_figure(histories, label), files / "lr.png"),
                  "Learning rate at the end of each epoch, per seed.")
        doc.image(plots.save_png(plots.gates_figure(histories, label), files / "gates.png"),
                  "Gate values of every MM block after each epoch (the gate nonlinearity of its parameter, "
                  "mean over channels), per seed.")
        doc.paragraph("Stage-2 epochs per seed: " + ", ".join(
            f"seed {s}: {len(h)} (best {run.results['per_seed'][s]['best_epoch']})" for s, h in histories.items())
            + ".")
    else:
        doc.paragraph("No stage-2 history was found (`seed_<s>/last/state.json`).")

    doc.heading(level, "Attention")
    doc.image(plots.save_png(plots.attention_figure(maps, test["attention_labels"], label), files / "attention.png"),
              f"Attention of the fusion tokens over AV time in each MM block, mean over heads, for the first "
              f"{len(maps['index'])} test samples (seed {sample_seed}); blank: AV steps past a sample's length.")
    _setup_sections(doc, run, level)


def _test_outputs(run: RunFiles, seed: int, n_attention: int, device: str, session) -> dict:
    """Rebuild seed `seed`'s best model (around `session`'s backbone when given) and run the
    test split, unless `session` trained that seed and kept its test predictions:
    -> `index`, `pred`, `labels` `(N,)`, `attention` (`attention.attention_maps` of the first
    `n_attention` samples) and `attention_labels` `(S,)` those samples' true scores."""
    from deepmlf_fast.hardware import resolve_device
    from deepmlf_fast.report.attention import attention_maps
    from deepmlf_fast.train.evaluate import predict
    from deepmlf_fast.train.run import load_run

    session, model = load_run(run.root, resolve_device(device), seed, session=session)
    p = session.test_predictions.get(seed)
    if p is None:
        p = predict(model, session.loader("test", session.cfg.train.eval_batch_size, False), session.eval_ctx,
                    desc="report")
    maps = attention_maps(model, session.loader("test", n_attention, False), session.eval_ctx, n_attention)
    return {"index": p["index"], "pred": p["pred"], "labels": p["labels"], "attention": maps,
            "attention_labels": session.data.test.labels[maps["index"]]}


def _setup_sections(doc: Doc, run: RunFiles, level: int) -> None:
    """Configuration, hardware, versions and wall time of a run."""
    cfg, resolved = run.cfg, run.config.get("resolved", {})
    m = cfg.model
    doc.heading(level, "Configuration")
    doc.table(["setting", "value"], [
        ["dataset", f"{cfg.data.dataset} ({cfg.data.path or 'embedded synthetic data'})"],
        ["backbone", m.backbone],
        ["parity", m.parity],
        ["fusion tokens", str(m.fusion.n_tokens)],
        ["MM blocks after LM blocks", ", ".join(map(str, m.fusion.mm_layers))],
        ["loss weights (fusion, av, text, clm)",
         f"{m.loss.w_fusion}, {m.loss.w_av}, {m.loss.w_text}, {m.loss.w_clm}"],
        ["batch size x accumulation", f"{cfg.optim.batch_size} x {cfg.optim.grad_accum}"],
        ["learning rates (MM, AV)", f"{cfg.optim.lr_mm:g}, {cfg.optim.lr_av:g}"],
        ["epochs (max, early stop)", f"{cfg.optim.max_epochs}, {cfg.optim.early_stop}"],
        ["seeds", ", ".join(map(str, cfg.train.seeds))],
        ["DeepSpeed", cfg.train.deepspeed or "no"],
    ])
    doc.code(json.dumps(run.config, indent=2, sort_keys=True), "config.json (the full configuration)")
    doc.heading(level, "Hardware and versions")
    doc.table(["", ""], [
        ["device", f"{resolved.get('device', '?')} ({resolved.get('device_name', '?')})"],
        ["CPU capability", str(resolved.get("cpu_capability", "?"))],
        ["precision (train / eval)", f"{resolved.get('precision', '?')} / {resolved.get('eval_precision', '?')}"
                                     f" ({resolved.get('precision_reason', '')})"],
        ["attention backend", str(resolved.get("attention_backend", "?"))],
        ["TF32", str(resolved.get("tf32", "?"))],
        ["python", f"{platform.python_version()} on {platform.platform()}"],
        *[[name, _version(name)] for name in VERSIONS],
    ])
    doc.paragraph("Device and precision are the run's (`config.json` → `resolved`); versions are those of the "
                  "environment that wrote this report.")
    doc.heading(level, "Wall time")
    epochs = sum(e["seconds"] for h in run.histories.values() for e in h)
    total = "not recorded" if run.seconds is None else _duration(run.seconds)
    doc.paragraph(f"Whole run (last invocation, `timing.json`): {total}; stage-2 epochs, all seeds: "
                  f"{_duration(epochs)}.")


def _version(name: str) -> str:
    """An installed distribution's version, read from its metadata (nothing is imported)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"
