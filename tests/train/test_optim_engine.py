"""Optimizer groups, the schedule, and the accumulation/clipping engine per parity mode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from deepmlf_fast.config import OptimConfig, parity_flags
from deepmlf_fast.train.engine import PlainEngine
from deepmlf_fast.train.optim import param_groups, warmup_cosine

from helpers import make_model


def _group_names(model, parity):
    groups = param_groups(model, OptimConfig(weight_decay_mm=0.1, weight_decay_av=0.2), parity_flags(parity))
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: ({names[id(p)] for p in g["params"]}, g["weight_decay"]) for g in groups}


def test_param_groups_corrected_exempt_norms_gates_tokens():
    model, _ = make_model("tiny-gpt2")
    groups = _group_names(model, "corrected")
    mm_no_decay, wd = groups["mm_no_decay"]
    assert wd == 0.0 and groups["av_decay"][1] == 0.2 and groups["mm_decay"][1] == 0.1
    for name in ("fusion_tokens.weight", "mm_blocks.1.xattn.gate.alpha", "mm_blocks.1.xattn.norm.weight",
                 "heads.task_norm.weight", "av_norm.weight", "mm_blocks.1.ffn.mlp.fc_in.bias",
                 "mm_blocks.1.ffn.gate.alpha"):
        assert name in mm_no_decay, name
    assert "mm_blocks.1.xattn.q_proj.weight" in groups["mm_decay"][0]
    assert "av_encoder.audio.encoder.layers.0.norm1.weight" in groups["av_no_decay"][0]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*(g[0] for g in groups.values())) == trained


def test_param_groups_official_exempt_only_biases():
    model, _ = make_model("tiny-gpt2")
    groups = _group_names(model, "official")
    assert all("bias" in n for n in groups["mm_no_decay"][0] | groups["av_no_decay"][0])
    assert {"fusion_tokens.weight", "mm_blocks.1.xattn.gate.alpha", "mm_blocks.1.xattn.norm.weight"} <= groups["mm_decay"][0]


def test_warmup_cosine_schedule_values():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = warmup_cosine(opt, warmup_steps=4, period=10, eta_min=1e-7)
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(5e-4) and lrs[4] == pytest.approx(1e-3)
    assert lrs[9] == pytest.approx(1e-7 + (1e-3 - 1e-7) * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lrs[14] == pytest.approx(1e-3)  # warm restart after one period


def _engine(parity, accum, clip=0.0):
    w = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=1.0)
    return w, PlainEngine([w], opt, None, accum=accum, clip=clip, flags=parity_flags(parity))


@pytest.mark.parametrize("parity", ["corrected", "official"])
def test_accumulation_mean_vs_sum_and_the_tail(parity):
    w, eng = _engine(parity, accum=2)
    grads = [torch.tensor([1.0, 0, 0]), torch.tensor([3.0, 0, 0]), torch.tensor([5.0, 0, 0])]
    for g in grads:
        eng.backward((w * g).sum())
        eng.maybe_step()
    stepped = eng.end_epoch()
    if parity == "corrected":
        # step 1 on mean(1, 3) = 2, then the tail (one micro-batch) on its own mean 5
        assert stepped and w[0].item() == pytest.approx(-7.0) and eng.steps_per_epoch(3) == 2
    else:
        # step 1 on sum(1, 3) = 4; the tail is dropped
        assert not stepped and w[0].item() == pytest.approx(-4.0) and eng.steps_per_epoch(3) == 1


def test_clipping_by_norm_vs_by_value():
    w, eng = _engine("corrected", accum=1, clip=1.0)
    eng.backward((w * torch.tensor([3.0, 4.0, 0.0])).sum())
    eng.maybe_step()
    assert w.detach().tolist() == pytest.approx([-0.6, -0.8, 0.0])
    w, eng = _engine("official", accum=1, clip=1.0)
    eng.backward((w * torch.tensor([3.0, 0.5, 0.0])).sum())
    eng.maybe_step()
    assert w.detach().tolist() == pytest.approx([-1.0, -0.5, 0.0])
