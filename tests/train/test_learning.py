"""DeepMLF fuses: the README's default run (the `demo` recipe: the real pretrained SmolLM2-135M on
the embedded synthetic MOSI data, whose label needs text and audio/vision together) ends, for
every seed it trained, with a fusion-token head that beats the text-only head by at least
`MARGIN` MAE and the audio-visual head by more, a multimodal prediction that beats the text and
AV heads by at least `MARGIN` and matches the fusion-token head (within `TIE`), and predictions
that get clearly worse when each test sample is given another sample's audio and vision.

Why "matches" for the fusion-token head: the multimodal head reads the mean of the same fusion
states the fusion-token head reads (plus t* and the AV mean, which the fusion tokens already see
through causal attention and the MM blocks), so the two land within seed noise of each other.
Measured over 3 seeds on each of 3 arithmetic paths (README, Presets), the task minus fusion
MAE ranged from -0.119 to +0.036 (mean -0.026, standard deviation 0.057), so `TIE` sits about
2.2 standard deviations above the mean: a CPU's rounding should not turn a tie red.
Recalibrating the task head's BatchNorm, a narrower task head or a lighter fusion loss did not
turn the tie into a margin.

The synthetic label is `y = 2 s a + v` (text polarity s, audio intensity a, visual cue v; see
`deepmlf_fast/data/synthetic.py`): the text alone gives the sign, the AV alone only v, so a head
that reads one modality cannot get below what that modality explains, and the fusion tokens beat
the text head only by reading the AV sequence through the MM blocks. With the cross-attention
cut, the fusion-token head cannot beat the text head and swapping AV changes nothing (checked:
see the README's Presets section).

Which runs are checked:
* by default the README's run (`deepmlf train`, precision `auto`): when `runs/demo` holds a
  finished run of exactly the current demo configuration (CI runs the README's command just
  before the tests), it is checked as it is, since training is deterministic (the same command
  gives byte-identical results, tests/train/test_kill_resume.py); otherwise the test trains it;
* with `DEEPMLF_LEARNING_RUNS=dir1:dir2` set, those finished runs instead: the demo recipe on
  other seeds or another precision (`deepmlf train --seeds 1991 1992 --precision fp32
  --output-dir dir1`), which is how the README's margin table was checked on each arithmetic
  path (`benchmarks/demo_margins.py`). CI checks only the README's run: a second path's
  training (8-9 min) would take CI past its 30 minutes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from deepmlf_fast.config import RunConfig, with_av_widths
from deepmlf_fast.presets import recipe
from deepmlf_fast.train.run import av_swap_maes, train_run

REPO = Path(__file__).resolve().parents[2]
MARGIN = 0.1
"""MAE by which the fusion-token head and the prediction must beat the text head, and swapping
AV must hurt."""
TIE = 0.1
"""MAE by which the prediction may trail the fusion-token head (seed noise, see above)."""
RUNS_ENV = "DEEPMLF_LEARNING_RUNS"


def _demo_like(saved: RunConfig, cfg: RunConfig) -> bool:
    """`saved` is the demo recipe `cfg`, apart from where it was written, its seeds and precision."""
    same = dataclasses.replace(saved.train, output_dir=cfg.train.output_dir, seeds=cfg.train.seeds,
                               precision=cfg.train.precision)
    return dataclasses.replace(saved, train=same) == cfg


def _read_config(run: Path) -> RunConfig | None:
    try:
        return RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, torch_threads) -> list[Path]:
    cfg = with_av_widths(recipe("demo"))  # as a run records it (the data's widths); output_dir: runs/demo
    listed = os.environ.get(RUNS_ENV)
    if listed:
        runs = [Path(p) for p in listed.split(os.pathsep) if p]
        for run in runs:
            saved = _read_config(run)
            assert saved is not None and _demo_like(saved, cfg) and (run / "results.json").is_file(), (
                f"{RUNS_ENV}: {run} is not a finished run of the demo recipe")
        return runs
    readme_run = REPO / cfg.train.output_dir
    if _read_config(readme_run) == cfg and (readme_run / "results.json").is_file():
        return [readme_run]
    out = tmp_path_factory.mktemp("learning") / "demo"
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)  # the README run's threads and arithmetic, also under pytest-xdist
    try:
        train_run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(out))))
    finally:
        torch.set_num_threads(threads)
    return [out]


def _seeds(runs: list[Path]):
    for run in runs:
        for seed, per_seed in json.loads((run / "results.json").read_text())["per_seed"].items():
            yield run, int(seed), per_seed["test"]


@pytest.mark.slow
def test_fusion_tokens_carry_the_cross_modal_signal(demo_runs):
    failures = []
    for run, seed, t in _seeds(demo_runs):
        print(run.name, seed, {k: round(t[k], 4) for k in ("MAE", "MAE_text", "MAE_av", "MAE_fusion", "Corr")})
        text_margin, av_margin = t["MAE_text"] - t["MAE_fusion"], t["MAE_av"] - t["MAE_fusion"]
        if not (text_margin >= MARGIN and av_margin > text_margin
                and t["MAE"] <= min(t["MAE_text"], t["MAE_av"]) - MARGIN and t["MAE"] <= t["MAE_fusion"] + TIE):
            failures.append((str(run), seed, {k: round(t[k], 4) for k in ("MAE", "MAE_text", "MAE_av", "MAE_fusion")}))
    assert not failures, failures


@pytest.mark.slow
def test_other_samples_audio_vision_make_the_prediction_clearly_worse(demo_runs):
    failures = []
    for run, seed, _ in _seeds(demo_runs):
        maes = av_swap_maes(run, seed)
        worse = {head: maes[f"swapped_{head}"] - maes[f"own_{head}"] for head in ("pred", "pred_fusion")}
        print(run.name, seed, {k: round(v, 4) for k, v in worse.items()})
        if min(worse.values()) <= MARGIN:
            failures.append((str(run), seed, worse))
        assert maes["swapped_pred_text"] == pytest.approx(maes["own_pred_text"], abs=1e-6)  # text never sees AV
    assert not failures, failures
