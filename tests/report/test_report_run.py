"""`deepmlf report` (and the report `deepmlf train` writes at its end) on a tiny finished run."""

from __future__ import annotations

import json
import shutil

import numpy as np

from deepmlf_fast.cli import main

PLOTS = ("scatter", "confusion", "curves", "lr", "gates", "attention")
EPOCHS, SEEDS = 2, (1, 2)  # the `demo_run` fixture's


def _table(md: str) -> dict[str, list[str]]:
    """The first Markdown table of a report: {metric: [cell per run]}."""
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    out = {}
    for line in rows[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "setting":  # the next table starts
            break
        out[cells[0]] = cells[1:]
    return out


def test_train_ends_by_writing_the_report(demo_run):
    md = (demo_run / "report.md").read_text()
    html = (demo_run / "report.html").read_text()
    for name in PLOTS:
        assert (demo_run / "report" / f"{name}.png").is_file(), name
        assert f"](report/{name}.png)" in md
    assert html.count('src="data:image/png;base64,') == len(PLOTS)  # self-contained
    for section in ("Test metrics", "Configuration", "Hardware and versions", "Wall time"):
        assert f"## {section}" in md and f"<h2>{section}</h2>" in html
    timing = json.loads((demo_run / "timing.json").read_text())["seconds"]
    minutes, seconds = divmod(round(timing), 60)
    assert f"{minutes}m {seconds:02d}s" in md


def test_every_plot_decodes_and_is_not_blank(demo_run):
    from matplotlib.image import imread

    for name in PLOTS:
        pixels = imread(demo_run / "report" / f"{name}.png")[..., :3]  # (H, W, 3) floats in [0, 1]
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200, name
        assert pixels.var() > 1e-3, (name, pixels.var())  # not a uniform canvas
        # Empty axes (frame, ticks, titles) are black, white and grey only; data is drawn in colour.
        coloured = (pixels.max(-1) - pixels.min(-1)) > 0.2
        assert coloured.mean() > 1e-3, (name, coloured.mean())


def test_report_numbers_are_results_json(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    table = _table((demo_run / "report.md").read_text())
    keys = results["metric_names"] + ["MAE_text", "MAE_av", "MAE_fusion"]
    assert list(table)[:len(keys)] == keys
    for key in keys:
        assert table[key] == [f"{results[key]:.4f} ± {results['std'][key]:.4f}"], key
    assert table["seeds"] == [str(len(SEEDS))]


def test_gate_curve_has_one_point_per_epoch_per_block(demo_run):
    from deepmlf_fast.report.plots import gates_figure
    from deepmlf_fast.report.writer import read_run

    run = read_run(demo_run)
    blocks = [str(i) for i in run.cfg.model.fusion.mm_layers]
    fig = gates_figure(run.histories, "gates")
    for ax in fig.axes[:2]:  # attention gate, FFN gate
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {f"block {b}, seed {s}" for b in blocks for s in SEEDS}
        for line in lines.values():
            assert list(line.get_xdata()) == list(range(1, EPOCHS + 1))
    attn = fig.axes[0].get_lines()[0]
    first = run.histories[str(SEEDS[0])]
    assert list(attn.get_ydata()) == [e["gates"][blocks[0]]["attn"] for e in first]


def test_attention_rows_sum_to_one_over_valid_steps(demo_run):
    maps = np.load(demo_run / "report" / "attention.npz")
    valid = maps["valid"]  # (S, L_av)
    blocks = [k for k in maps.files if k.startswith("block_")]
    config = json.loads((demo_run / "config.json").read_text())
    assert len(blocks) == len(config["model"]["fusion"]["mm_layers"]) and len(maps["index"]) == 4
    assert (~valid).any(), "the tiny run masks AV steps, so some must be invalid"
    for name in blocks:
        p = maps[name]  # (S, F, L_av), mean over heads
        assert p.shape[:2] == (4, config["model"]["fusion"]["n_tokens"])
        sums = (p * valid[:, None, :]).sum(-1)
        np.testing.assert_allclose(sums, 1.0, atol=1e-5)
        assert np.abs(p * ~valid[:, None, :]).max() == 0.0


def test_report_of_several_runs_sets_them_side_by_side(demo_run, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(demo_run, other, ignore=shutil.ignore_patterns("report*"))
    results = json.loads((other / "results.json").read_text())
    results["MAE"] = 9.0  # told apart in the table
    (other / "results.json").write_text(json.dumps(results))
    out = tmp_path / "both"
    assert main(["-q", "report", str(demo_run), str(other), "--out", str(out), "--seed", "2",
                 "--attention-samples", "2"]) == 0
    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    labels = [c.strip() for c in header.strip("|").split("|")][1:]
    assert labels == [demo_run.name, other.name]
    table = _table(md)
    assert table["MAE"][1].startswith("9.0000 ±") and not table["MAE"][0].startswith("9.0000")
    for label in labels:
        assert (out / "report" / label / "scatter.png").is_file()
        assert len(np.load(out / "report" / label / "attention.npz")["index"]) == 2
    assert "seed 2's best model" in md


def test_train_reports_with_its_own_backbone_and_matches_a_fresh_report(demo_run, tmp_path):
    """`deepmlf train` loads the backbone once, and predicts the test split once per seed: its
    report reuses the trained session and the first seed's test predictions. The report
    command, which loads everything again and predicts, draws the same predictions and attention."""
    assert (demo_run.parent / "backbone_loads").read_text() == "1"
    assert (demo_run.parent / "predictions").read_text().split().count("test") == 2
    assert "report" not in (demo_run.parent / "predictions").read_text().split()
    out = tmp_path / "fresh"
    assert main(["-q", "report", str(demo_run), "--out", str(out)]) == 0
    for name in ("attention.npz", "predictions.npz"):
        ours, fresh = np.load(demo_run / "report" / name), np.load(out / "report" / name)
        assert sorted(ours.files) == sorted(fresh.files)
        for key in ours.files:
            np.testing.assert_array_equal(ours[key], fresh[key])


def test_a_one_seed_run_reports_with_the_model_it_trained(tmp_path, monkeypatch, tiny_demo):
    """One seed in one process: the closing report draws with the model training left at its best
    weights (no second DeepMLF built around the backbone: at 7B that was the run's memory peak),
    and draws exactly what a fresh `deepmlf report` of the run draws (the attention maps come
    from the kept model; the predictions from training's test pass on both sides)."""
    from deepmlf_fast.train import run

    built = []
    new_model = run.Session.new_model
    monkeypatch.setattr(run.Session, "new_model", lambda self, seed: built.append(seed) or new_model(self, seed))
    out = tmp_path / "one"
    assert main(["-q", "train", *tiny_demo, "--epochs", "2", "--no-pretrain", "--seeds", "3",
                 "--output-dir", str(out)]) == 0
    assert built == [3]  # the one training built
    fresh = tmp_path / "fresh"
    assert main(["-q", "report", str(out), "--out", str(fresh)]) == 0
    assert built == [3, 3]  # the report command rebuilt it from the best weights
    for name in ("attention.npz", "predictions.npz"):
        ours, again = np.load(out / "report" / name), np.load(fresh / "report" / name)
        assert sorted(ours.files) == sorted(again.files)
        for key in ours.files:
            np.testing.assert_array_equal(ours[key], again[key])


def test_report_of_an_unfinished_run_fails_cleanly(demo_run, tmp_path, capsys):
    other = tmp_path / "unfinished"
    shutil.copytree(demo_run, other, ignore=shutil.ignore_patterns("report*", "results.json"))
    assert main(["-q", "report", str(other)]) == 2
    assert "has not finished" in capsys.readouterr().err
    assert not (other / "report.md").exists()
    assert main(["-q", "report", str(demo_run), "--seed", "7", "--out", str(tmp_path / "x")]) == 2
    assert "no seed 7" in capsys.readouterr().err


def test_a_bad_device_data_file_or_out_stops_the_report_before_it_writes(demo_run, tmp_path, capsys):
    """Each is found before the first figure: nothing is created under `--out` or the run."""
    before = sorted(p.relative_to(demo_run) for p in demo_run.rglob("*"))
    out = tmp_path / "out"
    assert main(["-q", "report", str(demo_run), "--out", str(out), "--device", "tpu"]) == 2
    assert "--device: expected auto, cpu, cuda or cuda:N, found 'tpu'" in capsys.readouterr().err
    moved = tmp_path / "moved"
    shutil.copytree(demo_run, moved, ignore=shutil.ignore_patterns("report*"))
    config = json.loads((moved / "config.json").read_text())
    config["data"]["path"] = str(tmp_path / "gone.pkl")
    (moved / "config.json").write_text(json.dumps(config))
    assert main(["-q", "report", str(demo_run), str(moved), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"run {str(moved)!r}: " in err and "gone.pkl: data file not found" in err
    assert not out.exists() and not list(moved.glob("report*"))
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["-q", "report", str(demo_run), "--out", str(afile / "sub")]) == 2
    assert "--out: expected a directory path under a directory, found the file" in capsys.readouterr().err
    assert afile.read_text() == "mine"
    assert sorted(p.relative_to(demo_run) for p in demo_run.rglob("*")) == before


def test_without_matplotlib_train_logs_one_line_instead(demo_run, monkeypatch, caplog):
    import sys

    from deepmlf_fast.report import report_after_training

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec then reports it missing
    with caplog.at_level("INFO", logger="deepmlf_fast"):
        assert report_after_training(demo_run) is None
    assert [r.message for r in caplog.records if "matplotlib is not installed" in r.message]
