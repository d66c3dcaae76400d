"""Bad input stops every entry point before any work or file: one end-to-end CLI call per case,
each asserting a non-zero exit, a one- or two-line message that names the field (or file),
what was expected and what was found, no traceback, and an output directory left untouched
(never created, or byte-identical when it existed). `--debug` shows the traceback."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from deepmlf_fast.cli import main
from deepmlf_fast.data import make_synthetic

TINY = ["--backbone", "tiny-gpt2", "--epochs", "1", "--pretrain-epochs", "1", "--batch-size", "8", "--grad-accum", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("data") / "mosi.pkl", "mosi", 16, 8, 8, seed=5)


def _bad_pickle(data: Path, tmp: Path, change) -> Path:
    with open(data, "rb") as f:
        raw = pickle.load(f)
    change(raw["valid"])
    out = tmp / "bad.pkl"
    with open(out, "wb") as f:
        pickle.dump(raw, f)
    return out


def _nan_label(split):
    split["regression_labels"] = split["regression_labels"].copy()
    split["regression_labels"][3] = np.nan


def _inf_vision(split):
    split["vision"] = split["vision"].copy()
    split["vision"][1, 0, 0] = np.inf


def _empty_text(split):
    split["raw_text"] = list(split["raw_text"])
    split["raw_text"][2] = "  "


def _label_range(split):
    split["regression_labels"] = split["regression_labels"].copy()
    split["regression_labels"][0] = 7.0


def _write(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


# (case id, extra train arguments (built from data, tmp), words the message must contain)
TRAIN_CASES = [
    ("missing-data-file", lambda d, t: ["--data", str(t / "nope.pkl")], ["nope.pkl", "not found"]),
    ("feature-width-vs-dataset", lambda d, t: ["--data", str(d), "--dataset", "mosei"],
     ["audio", "74", "5", "--dataset"]),
    ("unknown-backbone", lambda d, t: ["--backbone", "gpt-17"], ["gpt-17", "Presets"]),
    ("nan-label", lambda d, t: ["--data", str(_bad_pickle(d, t, _nan_label))], ["regression_labels", "valid"]),
    ("inf-feature", lambda d, t: ["--data", str(_bad_pickle(d, t, _inf_vision))], ["vision", "valid"]),
    ("empty-transcript", lambda d, t: ["--data", str(_bad_pickle(d, t, _empty_text))], ["raw_text", "valid"]),
    ("label-out-of-range", lambda d, t: ["--data", str(_bad_pickle(d, t, _label_range))],
     ["regression_labels", "valid", "7"]),
    ("missing-key", lambda d, t: ["--data", str(_bad_pickle(d, t, lambda s: s.pop("vision")))], ["vision", "valid"]),
    ("mm-layers-out-of-range", lambda d, t: ["--mm-layers", "1,9"], ["fusion.mm_layers", "[0, 3]", "[9]"]),
    ("mm-layers-not-integers", lambda d, t: ["--mm-layers", "1,x"], ["mm_layers", "1,x"]),
    ("mm-layers-duplicate", lambda d, t: ["--mm-layers", "2,2"], ["fusion.mm_layers", "duplicate"]),
    ("mm-layers-item-left-out", lambda d, t: ["--mm-layers", "1,,2"], ["fusion.mm_layers", "3,5,7", "'1,,2'"]),
    ("resume-and-overwrite", lambda d, t: ["--resume", "--overwrite"], ["--resume and --overwrite", "found both"]),
    ("set-resolved", lambda d, t: ["--set", "resolved.device=tpu"], ["resolved.device", "train.*"]),
    ("pretrain-epochs-without-pretraining", lambda d, t: ["--no-pretrain"],
     ["--pretrain-epochs", "--no-pretrain", "1"]),  # TINY gives --pretrain-epochs 1
    ("data-is-a-directory", lambda d, t: ["--data", str(t)], ["expected a data file", "found a directory"]),
    ("fusion-tokens-past-positions", lambda d, t: ["--fusion-tokens", "300"],
     ["fusion.n_tokens", "256 positions", "350"]),
    ("fusion-tokens-zero", lambda d, t: ["--fusion-tokens", "0"], ["fusion.n_tokens", ">= 1", "0"]),
    ("batch-size-zero", lambda d, t: ["--batch-size", "0"], ["optim.batch_size", ">= 1", "0"]),
    ("grad-accum-negative", lambda d, t: ["--grad-accum", "-2"], ["optim.grad_accum", ">= 1", "-2"]),
    ("lr-negative", lambda d, t: ["--lr", "-0.1"], ["optim.lr_mm", "> 0", "-0.1"]),
    ("epochs-zero", lambda d, t: ["--epochs", "0"], ["optim.max_epochs", ">= 1", "0"]),
    ("duplicate-seeds", lambda d, t: ["--seeds", "1", "1"], ["train.seeds", "distinct", "[1, 1]"]),
    ("seed-past-numpy-range", lambda d, t: ["--seeds", "5000000000"], ["train.seeds", "2**32 - 1", "5000000000"]),
    ("lr-infinite", lambda d, t: ["--lr", "inf"], ["optim.lr_mm", "inf"]),
    ("gate-init-nan", lambda d, t: ["--set", "fusion.gate_init=nan"], ["fusion.gate_init", "finite", "nan"]),
    ("heads-not-dividing-width", lambda d, t: ["--set", "fusion.n_heads=7"], ["fusion.n_heads", "128", "7"]),
    ("lora-rank-too-large", lambda d, t: ["--set", "fusion.lora_rank=999"], ["fusion.lora_rank", "128", "999"]),
    ("dropout-out-of-range", lambda d, t: ["--set", "fusion.dropout=1.5"], ["model.fusion.dropout", "[0, 1)", "1.5"]),
    ("unknown-field", lambda d, t: ["--set", "fusion.n_tokenz=3"], ["n_tokenz", "n_tokens"]),
    ("unknown-gate", lambda d, t: ["--set", "fusion.gate=relu"], ["fusion.gate", "sigmoid", "relu"]),
    ("set-without-value", lambda d, t: ["--set", "fusion.gate"], ["--set", "PATH=VALUE", "fusion.gate"]),
    ("betas-one-number", lambda d, t: ["--set", "optim.betas=0.9"], ["optim.betas", "two numbers", "0.9"]),
    ("av-heads-not-dividing", lambda d, t: ["--set", "av.n_heads=7"], ["av.n_heads", "30", "7"]),
    ("cuda-without-gpu", lambda d, t: ["--device", "cuda"], ["train.device", "cuda"]),
    ("unknown-device", lambda d, t: ["--device", "tpu"], ["train.device", "tpu"]),
    ("8bit-and-4bit", lambda d, t: ["--load-in-8bit", "--load-in-4bit"], ["model.quant", "--load-in-8bit", "--load-in-4bit"]),
    ("deepspeed-config-missing", lambda d, t: ["--deepspeed", str(t / "zero9.json")], ["zero9.json", "does not exist"]),
    ("deepspeed-config-not-json", lambda d, t: ["--deepspeed", _write(t, "ds.json", "{stage: 2")], ["ds.json", "JSON"]),
    ("deepspeed-contradicts-run", lambda d, t: ["--deepspeed", _write(t, "ds.json", '{"gradient_clipping": 0.5}')],
     ["gradient_clipping", "0.5", "5.0"]),
    ("deepspeed-with-official-parity",
     lambda d, t: ["--parity", "official", "--deepspeed", _write(t, "ds.json", "{}")], ["model.parity", "corrected"]),
    ("config-not-json", lambda d, t: ["--config", _write(t, "c.json", "not json")], ["--config", "c.json", "JSON"]),
    ("config-unknown-field", lambda d, t: ["--config", _write(t, "c.json", json.dumps({"optim": {"lrr": 1}}))],
     ["config.optim", "lrr"]),
    ("config-wrong-type", lambda d, t: ["--config", _write(t, "c.json", json.dumps({"optim": {"eps": "1e-8"}}))],
     ["optim.eps", "> 0", "'1e-8'"]),
    ("synthetic-sizes", lambda d, t: ["--set", "data.synthetic_sizes=0,1,1"], ["data.synthetic_sizes", ">= 1"]),
    ("av-width-contradicts-data", lambda d, t: ["--set", "av.audio_dim=7"], ["model.av.audio_dim", "width 5", "7"]),
]


def _assert_clean_failure(rc: int, err: str, words: list[str]) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0, err
    assert "Traceback" not in err, err
    assert 1 <= len(lines) <= 2 and lines[-1].startswith("error: "), err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"


@pytest.mark.parametrize("case, make_args, words", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bad_train_input_stops_before_anything(case, make_args, words, data, tmp_path, capsys):
    out = tmp_path / "run"
    args = make_args(data, tmp_path)
    base = [] if "--data" in args else ["--data", str(data), "--dataset", "mosi"]
    tiny = TINY[2:] if "--backbone" in args else TINY  # TINY starts with --backbone tiny-gpt2
    rc = main(["-q", "train", *base, *tiny, *args, "--output-dir", str(out)])
    _assert_clean_failure(rc, capsys.readouterr().err, words)
    assert not out.exists(), f"{case}: {out} was created"


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--epochs", "1.5"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err == "deepmlf train: error: argument --epochs: invalid int value: '1.5' (see deepmlf train --help)\n"


OTHER_CASES = [  # (case id, arguments (built from data, tmp), words the message must contain)
    ("make-synthetic-negative-seed", lambda d, t: ["make-synthetic", "--out", str(t / "s.pkl"), "--seed", "-1"],
     ["--seed", ">= 0", "-1"]),
    ("make-synthetic-out-is-a-directory", lambda d, t: ["make-synthetic", "--out", str(t)],
     ["--out", "file path", "existing directory"]),
    ("make-synthetic-out-under-a-file", lambda d, t: ["make-synthetic", "--out", str(d) + "/x.pkl"],
     ["--out", "under a directory", "mosi.pkl"]),
    ("convert-onto-its-source", lambda d, t: ["convert-data", str(d), str(d), "--dataset", "mosi"],
     ["dst", "other than the source"]),
    ("make-synthetic-name-contradicts-format",
     lambda d, t: ["make-synthetic", "--out", str(t / "s.pkl"), "--format", "npz"], ["--out", ".npz path", "s.pkl"]),
    ("convert-to-another-format-name", lambda d, t: ["convert-data", str(d), str(t / "x.pkl"), "--dataset", "mosi"],
     ["dst", ".npz path", "x.pkl"]),
    ("convert-under-a-file", lambda d, t: ["convert-data", str(d), str(d) + "/x.npz", "--dataset", "mosi"],
     ["dst", "under a directory"]),
    ("estimate-no-gpus", lambda d, t: ["estimate-memory", "--backbone", "tiny-gpt2", "--gpus", "0"],
     ["--gpus", ">= 1", "0"]),
    ("estimate-batch-zero", lambda d, t: ["estimate-memory", "--backbone", "tiny-gpt2", "--batch-size", "0"],
     ["optim.batch_size", ">= 1", "0"]),
    ("estimate-negative-text", lambda d, t: ["estimate-memory", "--backbone", "tiny-gpt2", "--text-tokens", "-5"],
     ["--text-tokens", ">= 1", "-5"]),
]


@pytest.mark.parametrize("case, make_args, words", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_bad_input_of_the_other_commands_stops_before_anything(case, make_args, words, data, tmp_path, capsys):
    before = data.read_bytes()
    rc = main(["-q", *make_args(data, tmp_path)])
    _assert_clean_failure(rc, capsys.readouterr().err, words)
    assert data.read_bytes() == before and list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_existing_run_is_left_byte_identical(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": {"backbone": "tiny-llama"}}))
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc = main(["-q", "train", "--data", str(data), "--dataset", "mosi", *TINY, "--output-dir", str(out)])
    _assert_clean_failure(rc, capsys.readouterr().err, ["different configuration", "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_output_dir_that_is_a_file(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("not a directory")
    rc = main(["-q", "train", "--data", str(data), "--dataset", "mosi", *TINY, "--output-dir", str(out)])
    _assert_clean_failure(rc, capsys.readouterr().err, ["train.output_dir", "directory", "file"])
    assert out.read_text() == "not a directory"
    for command in ("train", "sweep"):  # a run directory under the file
        grid = ["--grid", "fusion.dropout=0.1,0.2"] if command == "sweep" else []
        rc = main(["-q", command, "--data", str(data), "--dataset", "mosi", *TINY, *grid, "--output-dir",
                   str(out / "sub")])
        field = "train.output_dir" if command == "train" else "sweep directory"
        _assert_clean_failure(rc, capsys.readouterr().err, [field, "under a directory", str(out)])
        assert out.read_text() == "not a directory"


@pytest.fixture
def fake_run(data, tmp_path) -> Path:
    """A run directory as `deepmlf train` leaves it, with weights we then damage."""
    from deepmlf_fast.presets import adapt_to_backbone, recipe_for_dataset
    from deepmlf_fast.config import apply_overrides

    cfg = apply_overrides(adapt_to_backbone(recipe_for_dataset("mosi"), "tiny-gpt2"),
                          {"data.path": str(data), "train.seeds": (3,)})
    run = tmp_path / "run"
    (run / "seed_3").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run / "seed_3" / "best.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    return run


def test_predict_checks_its_out_before_predicting(fake_run, tmp_path, capsys, monkeypatch):
    from deepmlf_fast import cli

    monkeypatch.setattr(cli, "_trained_split", lambda *a, **k: pytest.fail("the model was loaded"))
    for out, words in ((tmp_path, ["--out", "file path", "existing directory"]),
                       (fake_run / "config.json" / "p.csv", ["--out", "under a directory", "config.json"])):
        rc = main(["-q", "predict", "--run", str(fake_run), "--out", str(out)])
        _assert_clean_failure(rc, capsys.readouterr().err, words)


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_damaged_files_are_named(command, fake_run, tmp_path, capsys):
    rc = main(["-q", command, "--run", str(fake_run), "--device", "cpu"])
    _assert_clean_failure(rc, capsys.readouterr().err, ["best.safetensors", "damaged"])
    rc = main(["-q", command, "--run", str(fake_run), "--seed", "7"])
    _assert_clean_failure(rc, capsys.readouterr().err, ["seed_7", "seed 7", "its seeds: [3]"])
    (fake_run / "config.json").write_text('{"model": ')
    rc = main(["-q", command, "--run", str(fake_run)])
    _assert_clean_failure(rc, capsys.readouterr().err, ["config.json", "damaged", "JSON"])
    rc = main(["-q", command, "--run", str(tmp_path / "none")])
    _assert_clean_failure(rc, capsys.readouterr().err, ["none", "config.json is missing"])


def test_damaged_npz_is_named(tmp_path, capsys):
    bad = tmp_path / "data.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    out = tmp_path / "run"
    rc = main(["-q", "train", "--data", str(bad), "--dataset", "mosi", *TINY, "--output-dir", str(out)])
    _assert_clean_failure(rc, capsys.readouterr().err, ["data.npz", "cannot read as .npz"])
    assert not out.exists()


def test_debug_shows_the_traceback(data, tmp_path, capsys):
    rc = main(["--debug", "-q", "train", "--data", str(data), "--dataset", "mosi", *TINY, "--batch-size", "0",
               "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and "optim.batch_size" in err
