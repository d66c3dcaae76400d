"""Unit tests of the benchmark plumbing (not benchmarks): the shape registry, ratios, the CSV
record, the Markdown renderer and the gradient check of the backward modes. Fast, CPU only."""

from __future__ import annotations

import csv

import pytest
import torch

import harness
import render
import shapes


def test_registry_is_derived_from_presets():
    gpt2, large, smol, llama = (shapes.dims(b) for b in shapes.FULL_BACKBONES)
    # Released recipes (reference §1.2): F, MM heads / head dim.
    assert (gpt2.n_fusion, gpt2.mm_heads, gpt2.d_model // gpt2.mm_heads) == (12, 16, 48)
    assert (large.n_fusion, large.d_model // large.mm_heads) == (12, 80)
    assert (smol.n_fusion, smol.d_model // smol.mm_heads) == (8, 128)
    assert (llama.d_model, llama.n_heads, llama.head_dim) == (4096, 32, 128)
    assert shapes.dims(shapes.GQA_BACKBONE).n_kv_heads < shapes.dims(shapes.GQA_BACKBONE).n_heads


@pytest.mark.parametrize("tier", ["small", "full"])
def test_shape_lists(tier):
    xs, ss = shapes.cross_attention_shapes(tier), shapes.self_attention_shapes(tier)
    assert len({s.key for s in xs}) == len(xs) and len({s.key for s in ss}) == len(ss)
    if tier == "full":
        assert {s.n_fusion for s in xs} == set(shapes.FUSION_TOKENS)
        assert {s.av_len for s in xs} == set(shapes.AV_LENGTHS)
        assert {s.batch for s in xs} == set(shapes.BATCHES)
        assert any(s.dims.n_kv_heads != s.dims.n_heads for s in ss)


def test_text_length_draw():
    draw = shapes.text_lengths(32)
    assert draw == shapes.text_lengths(32) and shapes.text_lengths(8) == draw[:8]
    assert all(1 <= n <= 50 for n in draw)
    assert 15 <= sum(draw) / len(draw) <= 25


def test_step_configs_cover_tiers():
    assert {s.backbone for s in shapes.step_configs("smoke", "cpu")} == {"tiny-gpt2", "tiny-llama"}
    assert {s.backbone for s in shapes.step_configs("table", "cpu")} == {"smollm2-135m", "gpt2"}
    assert "llama-7b" in {s.backbone for s in shapes.step_configs("table", "cuda")}
    for s in shapes.STEP_CONFIGS:
        m = s.run_config().model
        assert m.parity == "official" and m.fusion.lora_rank == 0


def test_gradient_check_scales_with_the_dtype_error(check_gradients):
    """The `check_gradients` fixture: a provider as accurate as the reference passes, one
    gradient off by 1 % fails naming it, and the bound follows the reference's own error."""
    g = torch.Generator().manual_seed(0)
    exact = [torch.randn(30, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    low = [t.float() for t in exact]
    noisy = [(t + 1e-3 * torch.randn(t.shape, generator=g, dtype=t.dtype)).bfloat16() for t in exact]
    check_gradients("same", "ab", low, low, exact)
    check_gradients("bf16", "ab", noisy, [t.bfloat16() for t in exact], exact)
    with pytest.raises(AssertionError, match=r"scaled: db max error .* \(reference in torch.float32"):
        check_gradients("scaled", "ab", [low[0], low[1] * 1.01], low, exact)
    with pytest.raises(AssertionError, match=r"bf16 scaled: da max error"):
        check_gradients("bf16 scaled", "ab", [noisy[0] * 1.2, noisy[1]], [t.bfloat16() for t in exact], exact)
    with pytest.raises(AssertionError, match="da has shape"):
        check_gradients("shape", "ab", [low[0].t(), low[1]], low, exact)


def test_device_peaks():
    assert harness.device_peak("NVIDIA H100 80GB HBM3").hbm_bytes_per_s == 3.35e12
    assert harness.device_peak("NVIDIA H100 PCIe").label == "H100 PCIe"
    assert harness.device_peak("NVIDIA H200").hbm_bytes_per_s == 4.8e12
    assert harness.device_peak("NVIDIA H100 NVL") is None
    assert harness.device_peak("Some Future GPU") is None


def _row(provider, median, shape="s", mode="forward", suite="cross_attention", **kw):
    t = harness.Timing([median * 0.9, median, median * 1.1], "events")
    return harness.make_row(t, suite=suite, provider=provider, mode=mode, shape=shape, dtype="bfloat16",
                            device="NVIDIA H100 80GB HBM3", peak=harness.device_peak("H100 80GB HBM3"), **kw)


def test_ratios_and_roofline():
    rows = [_row("eager_official", 100.0, bytes=3.35e6, flops=1e9), _row("sdpa", 50.0), _row("triton", 10.0,
            bytes=3.35e6, flops=1e8), _row("triton", 10.0, shape="other")]
    harness.fill_ratios(rows)
    tri = rows[2]
    assert tri.ratios == {"eager_official": pytest.approx(10.0), "sdpa": pytest.approx(5.0)}
    assert rows[3].ratios == {"eager_official": None, "sdpa": None}  # no baseline in that group
    assert tri.gbps == pytest.approx(335.0)  # 3.35 MB in 10 us
    assert tri.pct_roofline == pytest.approx(10.0)  # memory-bound: 1 us at 3.35 TB/s of a 10 us run
    assert rows[0].p20_us < rows[0].median_us < rows[0].p80_us


def test_csv_and_render_roundtrip(tmp_path):
    rows = [_row("eager_official", 100.0, bytes=1e6), _row("triton", 20.0, bytes=1e6),
            _row("official", 2e6, suite="step", mode="train_step", peak_mem_mb=900.0),
            _row("ours", 5e5, suite="step", mode="train_step", peak_mem_mb=250.0)]
    harness.fill_ratios(rows)
    harness.append_csv(rows, tmp_path, run_id="r1")
    harness.append_csv(rows[:2], tmp_path, run_id="r2")
    with open(tmp_path / "cross_attention.csv", newline="") as f:
        recs = list(csv.DictReader(f))
    assert list(recs[0]) == harness.csv_columns("cross_attention") and len(recs) == 4
    md = render.render(tmp_path, ["cross_attention", "step"])
    assert "run r2" in md and "run r1" not in md.split("### Whole")[0]  # latest micro run only
    assert "5.00×" in md  # triton vs eager_official
    assert "4.00×" in md and "0.28" in md  # step speed-up and memory ratio
    assert "–" in md  # unmeasured cells stay empty, never estimated
    (tmp_path / "cross_attention.csv").write_text("other,header\n")
    with pytest.raises(RuntimeError, match="header"):
        harness.append_csv(rows[:1], tmp_path)
