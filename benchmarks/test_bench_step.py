"""Whole DeepMLF training step: official-style implementation vs deepmlf-fast.

    official  baselines/official_deepmlf.py: per-batch tokenisation padded to L = 50, fusion tokens
              after the padded text, HF forward (sdpa) with the dense causal + key-padding mask,
              Flamingo-style MM blocks (explicit-softmax cross-attention, scale 1/sqrt(D), gated FFN
              over all positions), full-vocabulary logits over all L + F positions, CLM on the first L
    ours      deepmlf_fast: build_model + DeepMLF.forward + deepmlf_loss (packed rows, varlen
              attention, fused cross-attention op, chunked LM-head cross-entropy on text rows only)

Both sides: the same configuration (the backbone's recipe, parity 'official', LoRA off), the same
backbone weights (same seed, or the same checkpoint) and the same initial values of every new
module (the official model is built from ours), the same batch, AdamW (lr 1e-4, betas 0.9/0.95)
and value clipping of the MM-side gradients; `test_bench_step_parity.py` checks they compute the same
loss. A step = forward, loss, backward, clip, optimizer step, zero_grad.

Each provider runs in its own process (`step_runner.py`, whose docstring details the timing and the
peak-memory method): median / p20 / p80 step time over the timed steps, and the peak memory the
training adds on top of the built model (CUDA: max_memory_allocated; CPU: peak RSS). The row of
`ours` carries the speed-up over `official` (ratio column) and the memory ratio (note).

Configurations come from `shapes.STEP_CONFIGS`: tiny backbones when benchmarks are disabled (CI
smoke), the device's table otherwise (SmolLM2-135M and GPT-2-random on CPU; GPT-2, GPT-2-large and
Llama-7B with random weights at batch 32 on CUDA). The project's targets (step >= 3x the official
on CPU, >= 5x on GPU, <= 1/3 of its peak memory) are read from the recorded table, not asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import harness
from shapes import StepConfig

SUITE = "step"
HERE = Path(__file__).resolve().parent
PROVIDERS = ("official", "ours", "ours_recompute")

_PEAKS: dict[tuple[str, str], float] = {}
_PARITY: dict[tuple[str, str], dict] = {}
_PARITY_FP32: dict[str, dict] = {}


def _run_provider(step_config: StepConfig, provider: str, bench_env, tmp_path: Path) -> dict:
    """Two fresh processes per provider: one timed with the normal allocator, one for peak memory.

    The memory run fixes glibc's mmap threshold (which also disables its dynamic one) so freed
    large tensors go back to the OS at once and RSS follows live memory (see step_runner's
    docstring); that costs page faults, so it is never the run that is timed. With benchmarks
    disabled (the CI smoke tier) nothing is timed for real, so the memory run's process gives
    both: the same code paths in half the process starts.
    """
    def run(kind: str, steps: int, env: dict) -> dict:
        out = tmp_path / f"{step_config.name}-{provider}-{kind}.json"
        cmd = [
            sys.executable, str(HERE / "step_runner.py"), "--config", step_config.name, "--provider", provider,
            "--device", bench_env.device.kind, "--steps", str(steps), "--warmup", str(bench_env.warmup_steps),
            "--threads", str(bench_env.threads), "--out", str(out),
        ]
        timeout = 1800 if bench_env.enabled else 600
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"step_runner {step_config.name}/{provider} ({kind}) failed (rc {proc.returncode}):\n"
                        f"{proc.stderr[-4000:]}")
        return json.loads(out.read_text())

    memory_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    if bench_env.device.kind == "cpu" and not bench_env.enabled:
        return run("time+memory", bench_env.steps, memory_env)
    timed = run("time", bench_env.steps, dict(os.environ))
    if bench_env.device.kind != "cpu":
        return timed
    memory = run("memory", 1, memory_env)
    return dict(timed, peak_mb=memory["peak_mb"], mem_method=memory["mem_method"])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_training_step(step_config: StepConfig, provider: str, bench_env, record_row, tmp_path):
    res = _run_provider(step_config, provider, bench_env, tmp_path)
    assert all(map(_finite, res["losses"])), f"non-finite loss: {res['losses']}"
    timing = harness.Timing([t * 1e6 for t in res["times_s"]], "wall-clock")
    assert res["flops"] > 0 and 0 < res["fraction_of_gemm"], res
    _PEAKS[(step_config.name, provider)] = res["peak_mb"]
    _PARITY[(step_config.name, provider)] = res["parity"]
    if provider == "official" and res["parity_fp32"] is not None:
        _PARITY_FP32[step_config.name] = res["parity_fp32"]
    reference = _PARITY.get((step_config.name, "official"))
    if provider.startswith("ours") and reference is not None:
        _assert_same_step(res["parity"], reference, _PARITY_FP32.get(step_config.name), step_config.precision)
    notes = [
        f"B={res['batch']} F={res['n_fusion']} mm={len(res['mm_layers'])} clm={res['w_clm']:g}",
        f"tokens/step={res['tokens_per_step']}", f"mem={res['mem_method']}", f"text={res['text_source']}",
        f"GFLOP/step={res['flops'] / 1e9:.2f}", f"GFLOP/s={res['achieved_flops_per_s'] / 1e9:.1f}",
        f"gemm_GFLOP/s={res['gemm_flops_per_s'] / 1e9:.1f}", f"fraction_of_gemm={res['fraction_of_gemm']:.2f}",
        f"threads={res['threads']}" if bench_env.device.kind == "cpu" else "",
        res["note"],
    ]
    other = _PEAKS.get((step_config.name, "official"))
    if provider.startswith("ours") and other:
        notes.append(f"peak_mem_vs_official={res['peak_mb'] / other:.3f}")
    shape = f"{res['backbone']}{' (random init)' if step_config.random_init else ''}/B{res['batch']}"
    record_row(harness.make_row(
        timing, suite=SUITE, provider=provider, mode="train_step", shape=shape, dtype=res["dtype"],
        device=bench_env.device.name, peak=None, peak_mem_mb=res["peak_mb"], note="; ".join(n for n in notes if n),
    ))


def _assert_same_step(ours: dict, official: dict, fp32: dict | None, precision: str) -> None:
    """Both providers compute the same training step: equal loss terms and gradients on the
    deterministic parity forward.

    fp32: equal within fp32 rounding (tolerances as `test_bench_step_parity.py`).
    bf16: both sides are bf16 roundings of the same fp32 step (`fp32`: the official side's values
    with its weights cast to fp32), and how far each lands from it depends on the CPU's bf16
    arithmetic (AMX, AVX512-BF16, CUDA), so a fixed bound between the two sides holds on one
    machine and fails on the next. Ours must land no further from fp32 than 3x the official
    side (FlashAttention's error-ratio criterion, as the kernel tests use), plus 4 bf16 unit
    roundoffs (2^-8 each) of the value's scale for values the official side happens to round
    almost exactly (one scalar loss). The fusion tokens' gradient is left out in bf16: it is not
    a property of either implementation there (both sides' L1 terms change sign under bf16
    rounding). Measured on
    SmolLM2-135M B16, the relative errors from fp32, ours / official: AMX 0.09 / 1.24 (fusion
    tokens), 0.09 / 0.06 (query projection); the same Xeon capped to AVX512-BF16 1.36 / 0.26 and
    0.07 / 0.04; on an AVX512-BF16 EPYC (earlier code, relative Frobenius error) 1.29 / 0.32 for
    the fusion tokens. What this resolves, on the AMX Xeon: every MM gate of ours scaled by 1.5
    under bf16 autocast fails it (task loss 0.028 from fp32 against a bound of 0.0245; the query
    projection's gradient 0.73 against the official side's 0.056), scaled by 1.1 it passes: bf16
    rounding through 30 blocks moves these values as much. Functional differences are the fp32
    configurations' to catch (1e-3 and tighter).
    """
    import torch

    assert ours.keys() == official.keys(), (sorted(ours), sorted(official))
    if precision == "bf16":
        assert fp32 is not None and fp32.keys() == official.keys(), "bf16 run without the official fp32 reference"
    for key in ours:
        a, b = torch.tensor(ours[key]), torch.tensor(official[key])
        if precision != "bf16":
            if key.startswith("loss_"):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=3e-6, msg=key)
            else:
                assert (a - b).abs().max().item() <= 1e-3 * (b.abs().max().item() + 1e-12), key
        elif key != "grad_fusion_tokens":
            ref = torch.tensor(fp32[key])
            err_ours, err_official = (a - ref).abs().max().item(), (b - ref).abs().max().item()
            floor = 4 * 2.0**-8 * ref.abs().max().item()
            assert err_ours <= 3 * err_official + floor, (
                f"{key}: bf16 error from fp32 {err_ours:.3g} (ours) against {err_official:.3g} (official), "
                f"bound {3 * err_official + floor:.3g}")


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
