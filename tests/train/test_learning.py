"""DeepMLF fuses: the README's default run (the `demo` recipe: the real pretrained SmolLM2-135M on
the embedded synthetic MOSI data, whose label needs text and audio/vision together) ends with a
fusion-token head that beats both the text-only and the audio-visual heads, a multimodal
prediction that beats every single head, and a prediction that gets clearly worse when each test
sample is given another sample's audio and vision.

The synthetic label is `y = 2 s a + v` (text polarity s, audio intensity a, visual cue v; see
`deepmlf_fast/data/synthetic.py`): the text alone gives the sign, the AV alone only v, so a head
that reads one modality cannot get below what that modality explains, and the fusion tokens beat
the text head only by reading the AV sequence through the MM blocks.

The run is the same command as the README's (`deepmlf train`, precision `auto`): when `runs/demo`
holds a finished run of exactly the current demo configuration (CI runs the README's command just
before the tests), it is checked as it is, since training is deterministic (the same command gives
byte-identical results, tests/train/test_kill_resume.py); otherwise the test trains it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepmlf_fast.config import RunConfig
from deepmlf_fast.presets import recipe
from deepmlf_fast.train.evaluate import predict
from deepmlf_fast.train.run import load_run, train_run

REPO = Path(__file__).resolve().parents[2]


def _finished(run: Path, cfg: RunConfig) -> bool:
    """`run` holds a finished run of `cfg` (same configuration apart from where it was written)."""
    try:
        saved = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    except (OSError, ValueError):
        return False
    return saved == cfg and (run / "results.json").is_file()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    cfg = recipe("demo")  # its output_dir is the README run's, runs/demo
    if _finished(REPO / cfg.train.output_dir, cfg):
        return REPO / cfg.train.output_dir
    out = tmp_path_factory.mktemp("learning") / "demo"
    train_run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(out))))
    return out


@pytest.mark.slow
def test_fusion_tokens_carry_the_cross_modal_signal(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    print({k: round(results[k], 4) for k in ("MAE", "MAE_text", "MAE_av", "MAE_fusion", "Corr")})
    assert results["MAE_fusion"] < results["MAE_text"] - 0.02, results
    assert results["MAE_fusion"] < results["MAE_av"] - 0.1, results
    assert results["MAE"] < min(results["MAE_text"], results["MAE_av"], results["MAE_fusion"]), results


@pytest.mark.slow
def test_other_samples_audio_vision_make_the_prediction_clearly_worse(demo_run):
    session, model = load_run(demo_run, torch.device("cpu"))
    test = session.data.test
    mine = predict(model, session.loader("test", 64, False), session.eval_ctx)
    perm = np.random.default_rng(0).permutation(len(test))
    test.audio, test.vision = test.audio[perm], test.vision[perm]
    if test.audio_lengths is not None:
        test.audio_lengths, test.vision_lengths = test.audio_lengths[perm], test.vision_lengths[perm]
    swapped = predict(model, session.loader("test", 64, False), session.eval_ctx)

    def mae(pred):
        return float(np.abs(pred - mine["labels"]).mean())

    assert mae(swapped["pred"]) > mae(mine["pred"]) + 0.1, (mae(mine["pred"]), mae(swapped["pred"]))
    assert mae(swapped["pred_fusion"]) > mae(mine["pred_fusion"]) + 0.1
    assert mae(swapped["pred_text"]) == pytest.approx(mae(mine["pred_text"]), abs=1e-6)  # text never sees AV
