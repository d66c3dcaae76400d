"""Sanity check (not a benchmark): the official-style baseline and deepmlf-fast compute the same
training loss on the same batch, so the step benchmark compares two implementations of one function.

Setup: a step configuration's recipe in parity 'official', every dropout and augmentation off, the
official-style model built from the deepmlf-fast one (`from_deepmlf`: same backbone, same fusion
tokens, AV encoder, MM blocks and heads), both in training mode (BatchNorm on batch statistics), the
causal-LM term on.

Exact equality is not expected: the official path runs the LM over the padded `(B, L + F)` batch with
a dense mask, deepmlf-fast over packed real rows, so attention and GEMM reductions run in a different
order (and the CLM cross-entropy is chunked). In fp32 that reorders float sums at the 1e-7 level;
the test allows 3e-6 absolute (1e-5 relative) on every loss part and prediction, tight enough to
catch a difference of the size of the MM-norm epsilon (1e-5 vs the official 1e-6 moves the Llama
heads by ~1e-4), and 1e-3 relative on the gradients of the fusion tokens and of the first MM
block's query projection.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from baselines.official_deepmlf import OfficialStyleDeepMLF
from deepmlf_fast.errors import BackboneError
from shapes import StepConfig, step_run_config
from step_common import build_ours, forward_loss, make_batch, no_randomness

CASES = [("tiny-gpt2", "sdpa"), ("tiny-gpt2", "eager"), ("tiny-llama", "sdpa")]


def _no_randomness(cfg):
    m = cfg.model
    model = dataclasses.replace(
        m,
        av=dataclasses.replace(m.av, dropout=0.0, p_perm=0.0),
        fusion=dataclasses.replace(m.fusion, dropout=0.0),
        text=dataclasses.replace(m.text, seqaug=False),
    )
    return dataclasses.replace(cfg, model=model)


@pytest.mark.parametrize("backbone,attn", CASES, ids=[f"{b}-{a}" for b, a in CASES])
def test_official_style_matches_deepmlf_fast(backbone, attn):
    run_cfg = _no_randomness(step_run_config(StepConfig("parity", backbone, batch=6, clm=True)))
    cfg = run_cfg.model
    assert cfg.parity == "official" and cfg.loss.w_clm > 0
    try:
        ours, tok, _ = build_ours(cfg, "cpu")
    except BackboneError as exc:  # the tiny backbones need the offline tokenizer assets
        pytest.skip(f"{backbone}: {exc}")
    official = OfficialStyleDeepMLF.from_deepmlf(ours, tok, attn_implementation=attn)
    for m in (ours, official):
        m.train()
    batch = make_batch(run_cfg, tok, 6, "cpu")
    assert int(batch.lengths.min()) < cfg.text.max_tokens  # padding is really exercised

    with no_randomness(ours), no_randomness(official):  # the LM's own dropouts too
        loss_a, parts_a, out_a = forward_loss("ours", ours, cfg, batch)
        loss_b, parts_b, out_b = forward_loss("official", official, cfg, batch)
    assert set(parts_a) == set(parts_b) == {"task", "fusion", "av", "text", "clm"}
    for k in parts_a:
        torch.testing.assert_close(parts_a[k], parts_b[k], rtol=1e-5, atol=3e-6, msg=lambda m: f"loss part {k}: {m}")
    for k in ("pred", "pred_text", "pred_fusion", "pred_av"):
        torch.testing.assert_close(out_a[k], out_b[k], rtol=1e-5, atol=3e-6, msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=3e-6)

    loss_a.backward()
    loss_b.backward()
    first = str(min(int(i) for i in ours.mm_blocks))
    pairs = {
        "fusion_tokens": (ours.fusion_tokens.weight.grad, official.fusion_tokens.grad),
        "mm.q_proj": (ours.mm_blocks[first].xattn.q_proj.weight.grad, official.mm_blocks[first].xattn.w_q.weight.grad),
    }
    for name, (ga, gb) in pairs.items():
        assert ga is not None and gb is not None, name
        torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-6, msg=lambda m: f"grad {name}: {m}")
