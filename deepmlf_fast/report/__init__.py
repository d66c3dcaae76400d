"""Experiment reports of finished runs and sweeps, and the sentiment classes of predictions.

    classes.py      7-class (MOSI, MOSEI) / 5-class (SIMS) sentiment classes, as MMSA rounds them
    attention.py    the fusion tokens' cross-attention probabilities, from a trained model
    plots.py        the figures (matplotlib, headless)
    document.py     one document rendered as Markdown and self-contained HTML
    writer.py       `deepmlf report`: report.md / report.html of finished runs
    sweep.py        `deepmlf sweep`'s summary and ablation plots (the driver is `train/sweep.py`)

matplotlib is optional (`pip install 'deepmlf-fast[report]'`, installed by `scripts/install.sh`);
importing this package does not need it. The TensorBoard scalars written during training are
`train/tensorboard.py`'s.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def matplotlib_available() -> bool:
    """True when matplotlib can be imported (reports and sweep plots need it)."""
    return importlib.util.find_spec("matplotlib") is not None


def report_after_training(run_dir: str | Path, device: str = "auto", session=None) -> Path | None:
    """Write a finished run's report (`writer.write_report`) when matplotlib is installed;
    otherwise log one line and return None. A failure is logged, not raised: the run itself
    has finished and its results are written. `session`: `train.run.run_training`'s, whose
    backbone the report reuses instead of loading it again."""
    if not matplotlib_available():
        log.info("no report: matplotlib is not installed (pip install 'deepmlf-fast[report]', then "
                 "`deepmlf report %s`)", run_dir)
        return None
    from deepmlf_fast.report.writer import write_report

    try:
        return write_report([run_dir], device=device, session=session)
    except Exception as e:  # noqa: BLE001 - the training result must not be lost to a plotting problem
        log.warning("the report could not be written (%s: %s); retry with `deepmlf --debug report %s`",
                    type(e).__name__, e, run_dir)
        return None
