"""`deepmlf sweep`: a 2 x 2 grid x 2 seeds that finishes, resumes without redoing finished
cells, and summarises exactly what the cells' results.json hold; grids checked up front."""

from __future__ import annotations

import json

import pytest

from deepmlf_fast.cli import main
from deepmlf_fast.config import apply_overrides
from deepmlf_fast.presets import adapt_to_backbone, recipe
from deepmlf_fast.train.sweep import depth_layers

TINY_DEMO = ["--backbone", "tiny-llama", "--precision", "fp32", "--batch-size", "16", "--no-pretrain",
             "--epochs", "1", "--seeds", "1", "2", "--set", "data.synthetic_sizes=32,16,16",
             "--set", "text.max_tokens=12", "--set", "av.max_len=8"]
GRID = ["--grid", "fusion.n_tokens=2,4", "--grid", "fusion.mm_layers=depth:1,2"]
CELLS = ["n_tokens=2__mm_layers=depth1", "n_tokens=2__mm_layers=depth2", "n_tokens=4__mm_layers=depth1",
         "n_tokens=4__mm_layers=depth2"]


def test_depth_k_spreads_k_blocks_from_the_recipes_first_to_the_last():
    demo = recipe("demo")  # SmolLM2-135M: 30 LM blocks, MM blocks after (14, 18, 21, 25, 29)
    assert depth_layers(demo, 1) == (29,)
    assert depth_layers(demo, 2) == (14, 29)
    assert depth_layers(demo, 5) == (14, 18, 22, 25, 29)
    assert depth_layers(demo, 16) == tuple(range(14, 30))
    tiny = adapt_to_backbone(demo, "tiny-llama")  # 4 blocks: the recipe's depths become (1, 2, 3)
    assert tiny.model.fusion.mm_layers == (1, 2, 3)
    assert depth_layers(tiny, 2) == (1, 3) and depth_layers(apply_overrides(tiny, {"fusion.mm_layers": (0,)}), 4) \
        == (0, 1, 2, 3)


@pytest.mark.parametrize("grid, message", [
    (["fusion.n_tokenz=2,4"], "no field 'n_tokenz'"),
    (["fusion.n_tokens=2,x"], "fusion.n_tokens: expected int, found 'x'"),
    (["fusion.n_tokens=0,4"], "model.fusion.n_tokens: expected an integer >= 1, found 0"),
    (["fusion.mm_layers=depth:1,5"], "fusion.mm_layers: depth:5 needs 5 distinct LM blocks"),
    (["fusion.n_tokens=depth:2"], "depth:K applies to fusion.mm_layers only"),
    (["fusion.mm_layers=1,3;9"], "fusion.mm_layers: indices must be in [0, 3]"),
    (["fusion.n_tokens=2,2"], "repeated value"),
    (["train.output_dir=a,b"], "the sweep sets it"),
    (["resolved.device=a,b"], "resolved.device: expected a train, data, model, optim or pretrain field"),
    (["fusion.n_tokens"], "expected PATH=VALUES"),
])
def test_a_bad_grid_fails_before_anything_runs(grid, message, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["-q", "sweep", *TINY_DEMO, *[a for g in grid for a in ("--grid", g)], "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not out.exists()


def test_sweep_finishes_resumes_and_summarises(tmp_path, monkeypatch):
    import deepmlf_fast.train.run as run_module

    out = tmp_path / "sweep"
    real, calls = run_module.train_run, []

    def interrupted_in_third_cell(cfg, **kwargs):
        calls.append(cfg.train.output_dir)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cfg, **kwargs)

    monkeypatch.setattr(run_module, "train_run", interrupted_in_third_cell)
    with pytest.raises(KeyboardInterrupt):
        main(["-q", "sweep", *TINY_DEMO, *GRID, "--output-dir", str(out)])
    finished = {c: (out / c / "results.json").stat().st_mtime_ns for c in CELLS[:2]}
    assert not (out / CELLS[2] / "results.json").exists()

    calls.clear()
    monkeypatch.setattr(run_module, "train_run", lambda cfg, **kw: calls.append(cfg.train.output_dir) or real(cfg, **kw))
    assert main(["-q", "sweep", *TINY_DEMO, *GRID, "--output-dir", str(out)]) == 0
    assert calls == [str(out / c) for c in CELLS[2:]]  # finished cells are not redone
    assert {c: (out / c / "results.json").stat().st_mtime_ns for c in CELLS[:2]} == finished

    summary = json.loads((out / "summary.json").read_text())
    assert [row["cell"] for row in summary["cells"]] == CELLS
    md = (out / "summary.md").read_text()
    for row in summary["cells"]:
        results = json.loads((out / row["cell"] / "results.json").read_text())
        config = json.loads((out / row["cell"] / "config.json").read_text())
        assert results["seeds"] == row["seeds"] == [1, 2]
        for key in results["metric_names"] + ["MAE_text", "MAE_av", "MAE_fusion"]:
            assert row["mean"][key] == results[key] and row["std"][key] == results["std"][key], key
        assert f"{results['MAE']:.4f} ± {results['std']['MAE']:.4f}" in md
        assert config["model"]["fusion"]["n_tokens"] == int(row["values"]["n_tokens"])
        assert tuple(config["model"]["fusion"]["mm_layers"]) == {"depth1": (3,), "depth2": (1, 3)}[
            row["values"]["mm_layers"]]
    for axis in ("n_tokens", "mm_layers"):
        assert (out / f"ablation_{axis}.png").stat().st_size > 10_000 and f"(ablation_{axis}.png)" in md
