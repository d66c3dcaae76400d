"""The DeepMLF model on the fused Triton ops (self-attention in every LM block, gated
cross-attention in every MM block) matches the model on the PyTorch references: outputs
and every trained parameter's gradient, both backbone families, both parity modes."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deepmlf_fast.config import LossConfig
from deepmlf_fast.model.losses import deepmlf_loss
from deepmlf_fast.ops.linear_cross_entropy import linear_cross_entropy

from helpers import make_batch, make_model, to_device


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


class _HostReads(TorchDispatchMode):
    """Records every op that reads a tensor's values back to the host (`.item()`, `int(t)`,
    `bool(t)`, `if t:`) or whose output size depends on the values (`nonzero`, `masked_select`,
    `unique`): each is a device-to-host sync on CUDA. CUDA-less, so it runs in CI."""

    SYNCING = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
               "aten::unique_dim", "aten::unique_consecutive")

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.found.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backbone_name", ["tiny-gpt2", "tiny-llama"])
def test_training_step_reads_nothing_back_from_the_device(device, backbone_name, monkeypatch):
    """Forward, every loss term (CLM included) and backward of a training step never sync:
    on CUDA under `set_sync_debug_mode("error")`; everywhere with `_HostReads` and with
    `.cpu()`, `.tolist()` and `.numpy()` refused inside the step (the host-built layout is
    made by the loader, before the step)."""
    model, tok = make_model(backbone_name, xattn_form="absorbed")
    model = model.to(device).train()
    model.set_backend("triton" if torch.device(device).type == "cuda" else "reference")
    batch = to_device(make_batch(tok), device)
    labels = torch.tensor([1.5, -2.0, 0.3], device=device)

    def refused(name):
        def call(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}() inside the training step")
        return call

    for name in ("cpu", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refused(name))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with _HostReads() as reads:
            out = model(**batch, clm=True)
            loss, _ = deepmlf_loss(out, labels, LossConfig(w_clm=1.0))
            loss.backward()
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
    assert reads.found == [], reads.found
    assert model.fusion_tokens.weight.grad.abs().sum() > 0  # the step did run the backward
