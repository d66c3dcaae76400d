"""One tiny finished run shared by the report, TensorBoard and predict tests.

It is the README's default command, `deepmlf train` on the `demo` preset, shrunk to a tiny
backbone and data so it trains in seconds: 2 seeds x 2 stage-2 epochs, AV length masks on
(so attention maps have invalid steps to mask). `deepmlf train` ends by writing the report.
"""

from __future__ import annotations

import pytest

from deepmlf_fast.backbones.load import load_backbone
from deepmlf_fast.cli import main

TINY_DEMO = ["--backbone", "tiny-llama", "--precision", "fp32", "--batch-size", "16",
             "--set", "data.synthetic_sizes=48,24,24", "--set", "text.max_tokens=16", "--set", "av.max_len=12",
             "--set", "train.log_every=1"]
"""The demo preset on a 4-block backbone, 96 synthetic samples, short sequences, running losses
recorded every step."""


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The finished run directory (seeds 1 and 2, 2 epochs each: early stopping waits 4)."""
    from deepmlf_fast.train import evaluate, run

    out = tmp_path_factory.mktemp("report") / "demo"
    loads, predictions = [], []
    predict = evaluate.predict

    def counted_predict(model, loader, ctx, desc="predict"):
        predictions.append(desc)
        return predict(model, loader, ctx, desc)

    with pytest.MonkeyPatch.context() as mp:  # counts backbone loads (training and its report share one)
        mp.setattr(run, "load_backbone", lambda *a, **k: loads.append(a) or load_backbone(*a, **k))
        # and the prediction passes, by `desc` (the report draws the run's own test predictions)
        mp.setattr(evaluate, "predict", counted_predict)
        assert main(["-q", "train", *TINY_DEMO, "--epochs", "2", "--pretrain-epochs", "1", "--av-length-masks",
                     "--seeds", "1", "2", "--output-dir", str(out)]) == 0
    (out.parent / "backbone_loads").write_text(str(len(loads)))
    (out.parent / "predictions").write_text(" ".join(map(str, predictions)))
    return out


@pytest.fixture
def tiny_demo() -> list[str]:
    """`TINY_DEMO`'s arguments, for a test's own run."""
    return list(TINY_DEMO)
