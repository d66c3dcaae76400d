"""The DeepMLF model on the fused Triton ops (self-attention in every LM block, gated
cross-attention in every MM block) matches the model on the PyTorch references: outputs
and every trained parameter's gradient, both backbone families, both parity modes."""

from __future__ import annotations

import pytest
import torch

from deepmlf_fast.ops.linear_cross_entropy import linear_cross_entropy

from helpers import make_batch, make_model


@pytest.mark.parametrize("parity, form", [("corrected", "absorbed"), ("official", "plain")])
def test_fused_model_matches_reference_model(device, backbone, parity, form):
    model, tok = make_model(backbone, parity=parity, xattn_form=form)
    model = model.to(device).eval()  # dropout off: identical computations on both paths
    batch = {k: v.to(device) for k, v in make_batch(tok, texts=["fine work", "bad", "a long and boring film"]).items()}
    runs = {}
    for backend in ("reference", "triton"):
        model.set_backend(backend)
        model.zero_grad()
        out = model(**batch, clm=True)
        out["clm_loss"] = linear_cross_entropy(out["clm"].hidden, out["clm"].weight, out["clm"].targets)
        (out["pred"].sum() + out["pred_fusion"].sum() + out["pred_text"].sum() + out["clm_loss"]).backward()
        runs[backend] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (ref, ref_grads), (fused, fused_grads) = runs["reference"], runs["triton"]
    for key in ("pred", "pred_text", "pred_fusion", "pred_av", "clm_loss"):
        torch.testing.assert_close(fused[key], ref[key], atol=5e-5, rtol=1e-4, msg=key)
    assert ref_grads.keys() == fused_grads.keys() and ref_grads
    for name in ref_grads:
        scale = ref_grads[name].abs().max().item() + 1e-6
        err = (fused_grads[name] - ref_grads[name]).abs().max().item()
        assert err <= 1e-4 * scale + 1e-6, f"{name}: {err:.3g} (scale {scale:.3g})"


def test_fused_model_under_bf16_autocast(device):
    """Custom ops are not autocast: the Triton path casts to autocast's dtype itself, and the
    fp32 residual stream keeps its precision."""
    model, tok = make_model("tiny-llama", xattn_form="absorbed")
    model = model.to(device).eval()
    batch = {k: v.to(device) for k, v in make_batch(tok, texts=["fine work", "bad"]).items()}
    outs = {}
    for backend in ("reference", "triton"):
        model.set_backend(backend)
        model.zero_grad()
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            out = model(**batch)
        out["pred"].float().sum().backward()
        outs[backend] = (out["pred"].float(), model.fusion_tokens.weight.grad.clone())
    torch.testing.assert_close(outs["triton"][0], outs["reference"][0], atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(outs["triton"][1], outs["reference"][1], atol=5e-2, rtol=1e-1)
