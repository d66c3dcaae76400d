"""The `deepmlf` command: the scripting contract, eval/predict, and bad input failing
cleanly (message naming the problem, exit status 2, nothing written)."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from deepmlf_fast.cli import main
from deepmlf_fast.data import make_synthetic
from deepmlf_fast.metrics import METRIC_KEYS

FAST = ["--epochs", "1", "--pretrain-epochs", "1", "--batch-size", "16", "--grad-accum", "1"]


@pytest.fixture(scope="module")
def mosi_file(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "unaligned_50.pkl", "mosi", 48, 16, 24, seed=3)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mosi_file):
    """The scripting contract, through the installed console script in a fresh process."""
    out = tmp_path_factory.mktemp("runs") / "contract"
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepmlf"), "-q", "train", "--data", str(mosi_file),
           "--dataset", "mosi", "--backbone", "tiny-gpt2", "--epochs", "1", "--output-dir", str(out),
           "--pretrain-epochs", "1", "--batch-size", "16", "--grad-accum", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_scripting_contract_writes_results(trained_run):
    results = json.loads((trained_run / "results.json").read_text())
    for key in METRIC_KEYS["mosi"]:
        assert isinstance(results[key], float), key
    assert results["dataset"] == "mosi" and results["backbone"] == "tiny-gpt2"
    config = json.loads((trained_run / "config.json").read_text())
    assert config["model"]["av"]["audio_dim"] == 5 and config["model"]["fusion"]["mm_layers"] == [1, 2, 3]


def test_eval_reproduces_the_test_metrics_and_predict_writes_every_sample(trained_run, tmp_path, capsys):
    assert main(["eval", "--run", str(trained_run), "--device", "cpu"]) == 0
    evaluated = json.loads((trained_run / "eval_test.json").read_text())["metrics"]
    results = json.loads((trained_run / "results.json").read_text())
    for key in METRIC_KEYS["mosi"]:
        assert evaluated[key] == pytest.approx(results[key], abs=1e-6), key
    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(trained_run), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 24 and {"id", "label", "pred"} <= set(rows[0])


def test_missing_data_file(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(tmp_path / "nope.pkl"), "--dataset", "mosi", "--backbone", "tiny-gpt2",
               "--output-dir", str(out), *FAST])
    assert rc == 2 and "nope.pkl: data file not found" in capsys.readouterr().err
    assert not out.exists()


def test_wrong_feature_dims_for_the_dataset(tmp_path, capsys, mosi_file):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(mosi_file), "--dataset", "mosei", "--backbone", "tiny-gpt2",
               "--output-dir", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "audio" in err and "74" in err and "5" in err
    assert not out.exists()


def test_unknown_backbone(tmp_path, capsys, mosi_file):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(mosi_file), "--dataset", "mosi", "--backbone", "gpt-17", "--output-dir", str(out)])
    assert rc == 2 and "gpt-17" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("problem, message", [
    ("nan_label", "regression_labels"),
    ("empty_text", "raw_text"),
    ("missing_key", "vision"),
    ("inf_feature", "vision"),
])
def test_bad_pickles(tmp_path, capsys, mosi_file, problem, message):
    with open(mosi_file, "rb") as f:
        raw = pickle.load(f)
    split = raw["valid"]
    if problem == "nan_label":
        split["regression_labels"] = split["regression_labels"].copy()
        split["regression_labels"][3] = np.nan
    elif problem == "empty_text":
        split["raw_text"] = list(split["raw_text"])
        split["raw_text"][2] = "  "
    elif problem == "missing_key":
        del split["vision"]
    else:
        split["vision"] = split["vision"].copy()
        split["vision"][1, 0, 0] = np.inf
    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as f:
        pickle.dump(raw, f)
    out = tmp_path / "run"
    rc = main(["train", "--data", str(bad), "--dataset", "mosi", "--backbone", "tiny-gpt2", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "valid" in err, err
    assert not out.exists()


def test_eval_of_a_missing_run(tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path / "none")]) == 2
    assert "config.json is missing" in capsys.readouterr().err


def test_make_synthetic_and_convert(tmp_path):
    pkl = tmp_path / "s.pkl"
    assert main(["make-synthetic", "--out", str(pkl), "--dataset", "sims", "--n-train", "4", "--n-valid", "2",
                 "--n-test", "2"]) == 0
    npz = tmp_path / "s.npz"
    assert main(["convert-data", str(pkl), str(npz), "--dataset", "sims"]) == 0
    from deepmlf_fast.data import load_mmsa

    data = load_mmsa(npz, "sims")
    assert data.train.audio.shape == (4, 400, 33) and data.train.vision.shape == (4, 55, 709)


def test_choices_come_from_the_registries():
    """--dataset, --backend and a gate kind accept exactly what the registries hold: a new
    dataset or gate kind is one entry there."""
    from deepmlf_fast.cli import build_parser
    from deepmlf_fast.config import RunConfig, apply_overrides, choices, validate_config
    from deepmlf_fast.data.specs import DATASETS
    from deepmlf_fast.ops.dispatch import BACKENDS
    from deepmlf_fast.ops.gate import GATES

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    options = {a.dest: a.choices for a in train._actions}
    assert tuple(options["dataset"]) == tuple(DATASETS) and tuple(options["backend"]) == BACKENDS
    assert choices("fusion.gate") == GATES
    for gate in GATES:
        validate_config(apply_overrides(RunConfig(), {"fusion.gate": gate, "fusion.mm_layers": (1,)}))



def test_help_does_not_import_torch():
    """`deepmlf --help` answers at once: parsing (choices from the config's registries) needs no torch."""
    import subprocess
    import sys

    code = ("import sys\nfrom deepmlf_fast.cli import build_parser\nbuild_parser()\n"
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_bitsandbytes_hub_kernel_warning_becomes_one_plain_line():
    """bitsandbytes warns at import on AVX512-BF16 CPUs that it failed to load a kernel from the
    Hub and to `pip install kernels`; a command's logging replaces that by one INFO line, and
    importing bitsandbytes itself prints no such warning (on any CPU). In a child process: the
    warning is emitted once per process."""
    import subprocess
    import sys

    from deepmlf_fast.cli import _BitsandbytesHubKernelNote

    code = (
        "import logging\n"
        "from deepmlf_fast.cli import setup_logging\n"
        "setup_logging(False)\n"
        "setup_logging(False)\n"
        "import bitsandbytes\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning(\n"
        "    'Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...', 'x')\n"
        "print('quiet:')\n"
        "logging.getLogger().setLevel(logging.WARNING)\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning(\n"
        "    'Failed to load CPU gemm_4bit_forward from kernels-community: %s', 'x')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = proc.stdout + proc.stderr
    assert "Failed to load" not in out and "pip install kernels" not in out, out
    loud, quiet = proc.stdout.split("quiet:")
    assert 1 <= loud.count(_BitsandbytesHubKernelNote.NOTE) <= 2  # ours, and bitsandbytes' own where it warns
    assert _BitsandbytesHubKernelNote.NOTE not in quiet
