"""`deepmlf bench` on CPU: the plan it prints (dry run, and on a machine without a GPU), its
argument checks, and the measuring, choosing, recording and writing it does on a GPU, run here
on tiny shapes through the Triton interpreter or with stand-in kernels."""

from __future__ import annotations

import csv
import os
import re

import pytest
import torch

from deepmlf_fast.bench import command, kernels
from deepmlf_fast.bench import step as bench_step
from deepmlf_fast.bench.shapes import CrossAttnShape, SelfAttnShape, dims
from deepmlf_fast.cli import main
from deepmlf_fast.hardware import environment_report, format_report
from deepmlf_fast.ops import autochoice, dispatch, selfcheck
from deepmlf_fast.ops.attention import varlen_attention_reference
from deepmlf_fast.ops.cross_attention import gated_cross_attention_reference
from helpers import tiny_run_config

CPU = torch.device("cpu")
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")


def tiny_cases() -> list[kernels.Case]:
    llama = dims("tiny-llama")  # GQA 4/2
    return [kernels.Case("self_attention", SelfAttnShape(llama, batch=2, n_fusion=4), torch.float32),
            kernels.Case("cross_attention", CrossAttnShape(llama, batch=2, n_fusion=4, av_len=12), torch.float32)]


@pytest.fixture
def stand_in_kernels(monkeypatch):
    """The Triton entry points replaced by the PyTorch reference times `scale` (1.0: a correct
    kernel, fast enough for CPU tests; else a wrong one)."""
    import deepmlf_kernels.attention as attn
    import deepmlf_fast.ops.cross_attention as xattn

    def use(scale: float):
        def varlen(q, k, v, *args, **kwargs):
            kwargs.pop("seed", None)
            return varlen_attention_reference(q, k, v, *args, **kwargs) * scale

        def cross(*args, seed=None, **kwargs):
            return gated_cross_attention_reference(*args, **kwargs) * scale

        monkeypatch.setattr(attn, "varlen_attention_triton", varlen)
        monkeypatch.setattr(xattn, "gated_cross_attention_triton", cross)
        monkeypatch.setattr(selfcheck, "_verdicts", {str(CPU): {f: None for f in selfcheck.FAMILIES}})
    return use


def test_dry_run_lists_every_recipe_shape_of_both_sites_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "tables"
    assert main(["bench", "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for backbone in kernels.RECIPE_BACKBONES:
        assert f"self_attention  {backbone}/" in text and f"cross_attention {backbone}/" in text
    assert "llama-7b/B32/F8/T58/H32/d128 bfloat16" in text  # the 7B recipe: bf16, batch 32, F 8, L 50
    assert "gpt2/B32/F12/Lav50/D768/H16 float32" in text  # the released GPT-2 recipe: fp32
    assert "sdpa_padded" in text and "flex" in text and "flash_attn" in text
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer")
def test_on_a_cpu_it_says_what_it_would_run_and_exits_0(tmp_path, capsys):
    out = tmp_path / "tables"
    assert main(["bench", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "is not one, so nothing was run. On a GPU it would run:" in text and "3. whole training step" in text
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps: expected an integer in [1, 1000], found 0"),
    (["--device", "cuda:7"], "--device: expected a device this machine has"),
    (["--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N, found 'tpu'"),
    (["--out", "FILE"], "--out: expected a directory path, found an existing file"),
    (["--out", "FILE/sub"], "--out: expected a directory path under a directory, found the file"),
])
def test_bad_arguments_fail_in_one_line_before_anything_runs(tmp_path, capsys, args, message):
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / a) if a.startswith("FILE") else a for a in args]
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@interpreted
def test_the_real_kernels_pass_the_check_and_are_timed_against_the_reference(monkeypatch):
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    rows = kernels.measure(tiny_cases(), CPU, log=lambda _: None, wall_samples=1)
    by = {(r.case.site, r.provider, r.mode): r for r in rows}
    for site in kernels.SITES:
        for mode in kernels.MODES:
            ours, ref = by[(site, "deepmlf", mode)], by[(site, "reference", mode)]
            assert ours.note == "" and ours.median_us > 0 and ref.median_us > 0
            assert ours.ratios["reference"] == pytest.approx(ref.median_us / ours.median_us)
    assert by[("self_attention", "sdpa_padded", "fwd+bwd")].median_us > 0  # padded SDPA checked and timed
    assert by[("self_attention", "flex", "forward")].note == "compiled FlexAttention is timed on CUDA only"
    # bytes: q, k, v, out of the packed rows (fp32), forward; backward adds twice that
    d, n = dims("tiny-llama"), sum(tiny_cases()[0].shape.seq_lens)
    fwd_bytes = 4 * (2 * n * d.n_heads * d.head_dim + 2 * n * d.n_kv_heads * d.head_dim)
    assert by[("self_attention", "reference", "forward")].bytes == fwd_bytes
    assert by[("self_attention", "reference", "fwd+bwd")].bytes == 3 * fwd_bytes


def test_a_wrong_kernel_is_reported_not_timed_and_auto_keeps_the_reference(stand_in_kernels):
    stand_in_kernels(1.02)
    rows = kernels.measure(tiny_cases(), CPU, log=lambda _: None, wall_samples=1)
    ours = [r for r in rows if r.provider == "deepmlf"]
    assert len(ours) == 4 and all(r.median_us is None and r.note.startswith("WRONG: forward differs") for r in ours)
    choices, evidence = kernels.choose(rows)
    assert choices == {"self_attention": "reference", "cross_attention": "reference"}
    assert "WRONG" in evidence["self_attention"]


def test_choose_sums_fwd_bwd_over_the_shapes_and_needs_every_shape():
    a, b = tiny_cases()[0], kernels.Case("self_attention", SelfAttnShape(dims("tiny-gpt2"), batch=2, n_fusion=4),
                                        torch.float32)

    def rows(ours_a, ours_b, ref_a, ref_b, fwd_ours=1.0):
        made = [kernels.Row(a, "deepmlf", "fwd+bwd", ours_a), kernels.Row(b, "deepmlf", "fwd+bwd", ours_b),
                kernels.Row(a, "reference", "fwd+bwd", ref_a), kernels.Row(b, "reference", "fwd+bwd", ref_b),
                kernels.Row(a, "deepmlf", "forward", fwd_ours), kernels.Row(a, "reference", "forward", 1000.0)]
        return kernels.choose(made)[0].get("self_attention")

    assert rows(10, 50, 30, 20) == "reference"  # wins one shape, loses the sum (60 > 50)
    assert rows(10, 40, 30, 20) == "triton"  # a tie goes to the kernels
    assert rows(10, 30, 30, 20, fwd_ours=1e6) == "triton"  # forward-only times do not decide
    assert rows(10, None, 30, 20) == "reference"  # not timed at one shape


def test_auto_follows_the_recorded_choice_per_site(tmp_path, monkeypatch):
    """On a (pretended) CUDA device whose kernels passed their self-check, `auto` runs the kernels
    where no bench ran, and the reference at a site where the bench measured SDPA faster."""
    monkeypatch.setenv("DEEPMLF_CACHE", str(tmp_path))
    gpu = torch.device("cuda")
    key = "Pretend GPU sm_90 | driver 1 cuda 12 | versions"
    monkeypatch.setattr(autochoice, "device_key", lambda d: key)
    monkeypatch.setattr(autochoice, "_choices", {})
    monkeypatch.setattr(selfcheck, "_verdicts", {str(gpu): {f: None for f in selfcheck.FAMILIES}})
    monkeypatch.setattr(selfcheck, "device_key", lambda d: key)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    for site in autochoice.SITES:
        assert dispatch.resolve_backend("auto", gpu, ("attention",), site) == "triton"
    path = autochoice.record_choices(gpu, {"self_attention": "reference", "cross_attention": "triton"},
                                     {"self_attention": "measured", "cross_attention": "measured"})
    assert path.parent == tmp_path / "autochoice"
    assert dispatch.resolve_backend("auto", gpu, ("attention",), "self_attention") == "reference"
    assert dispatch.resolve_backend("auto", gpu, ("attention",), "cross_attention") == "triton"
    assert dispatch.resolve_backend("triton", gpu, ("attention",), "self_attention") == "triton"  # explicit wins
    monkeypatch.setattr(autochoice, "_choices", {})  # a new process reads the record from disk
    assert autochoice.measured_choice("self_attention", gpu) == "reference"
    monkeypatch.setattr(autochoice, "device_key", lambda d: key + " newer driver")
    monkeypatch.setattr(autochoice, "_choices", {})
    assert autochoice.measured_choice("self_attention", gpu) is None  # another driver: measure again
    assert autochoice.last_record()["choices"]["self_attention"] == "reference"


def test_the_whole_step_compares_first_losses_then_times_each_backend(stand_in_kernels):
    cfg = tiny_run_config("unused")
    stand_in_kernels(1.0)
    rows = bench_step.compare_steps(cfg, CPU, ("triton", "reference"), "fp32", steps=2, warmup=1)
    assert [r.backend for r in rows] == ["triton", "reference"]
    assert rows[0].first_loss == pytest.approx(rows[1].first_loss, rel=1e-6)
    assert all(r.median_ms > 0 and r.note == "" for r in rows)
    stand_in_kernels(1.5)
    rows = bench_step.compare_steps(cfg, CPU, ("triton", "reference"), "fp32", steps=1, warmup=0)
    assert rows[0].median_ms is None and rows[0].note.startswith("WRONG: first loss differs")
    assert rows[1].median_ms > 0


def test_run_writes_the_tables_and_records_the_choice(tmp_path, monkeypatch, stand_in_kernels):
    """`command.run` end to end on CPU (tiny shapes, stand-in kernels, a tiny step recipe)."""
    monkeypatch.setenv("DEEPMLF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(autochoice, "_choices", {})
    stand_in_kernels(1.0)
    monkeypatch.setattr(kernels, "recipe_cases", tiny_cases)
    monkeypatch.setattr(command, "_step_config", lambda: tiny_run_config("unused"))
    monkeypatch.setattr(selfcheck, "run_checks", lambda d: {"attention": None, "gated_linear": "AssertionError: x"})
    opts = command.check_options("cpu", str(tmp_path / "tables"), steps=1)
    md, csv_path = command.run(opts, log=lambda _: None)
    text = md.read_text()
    assert md.parent == tmp_path / "tables" and md.name.startswith("bench-") and md.suffix == ".md"
    assert "- attention: ok" in text and "- gated_linear: FAILED: AssertionError: x" in text
    assert "## self_attention" in text and "## cross_attention" in text
    # the failed family stops the kernels wherever they need it: cross-attention and the step
    failed = "failed: RuntimeError: backend='triton': the gated_linear kernels failed their first-contact self-check"
    assert f"| cross_attention | float32 | fwd+bwd | deepmlf | - | - | - | - | - | {failed}".replace(
        "| cross_attention |", f"| {tiny_cases()[1].shape.key} |") in text
    assert "- cross_attention: **reference** (the Triton kernels were not timed at" in text
    assert f"| triton | - | - | - | - | {failed}" in text
    assert re.search(r"\| reference \| [0-9.]+ \| [0-9.]+-[0-9.]+ \| 1\.00 \| [0-9.]+ \|", text)
    record = autochoice.last_record()
    assert set(record["choices"]) == set(kernels.SITES)
    for site, backend in record["choices"].items():
        assert f"- {site}: **{backend}**" in text
    env = format_report(environment_report("cpu"))  # `deepmlf env` shows the record
    sites = ", ".join(f"{site} {backend}" for site, backend in record["choices"].items())
    assert f"auto per site   {sites} (deepmlf bench {record['time']}" in env
    with open(csv_path, newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 2 * (len(kernels.PROVIDERS["self_attention"]) + len(kernels.PROVIDERS["cross_attention"]))
    bandwidth_gb = float(lines[0]["bandwidth_gb_s"])
    for line in lines:
        assert line["torch"] == torch.__version__ and line["device"]
        if line["median_us"]:
            median_us = float(line["median_us"])
            pct = 100 * float(line["bytes"]) / (median_us * 1e-6) / (bandwidth_gb * 1e9)
            # what the CSV's rounding allows: pct to 0.1, bandwidth to 0.1 GB/s, the median to 0.01 us
            assert abs(float(line["pct_bandwidth"]) - pct) <= 0.05 + pct * (0.05 / bandwidth_gb + 0.005 / median_us) + 1e-6
        else:
            assert line["note"]
