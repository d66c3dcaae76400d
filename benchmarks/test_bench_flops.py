"""The step's exact FLOP count (`flops.py`) against PyTorch's own count of a real step.

On transcripts of equal length the reference attention path pads nothing, so every matrix
product it runs is one the formula counts: the two must agree to rounding. A formula that
forgot the fusion rows' backward below the first MM block, counted text rows there, or
missed the CLM head's gradient would be off by far more than the tolerance."""

from __future__ import annotations

import pytest
import torch

from deepmlf_fast.model.losses import deepmlf_loss
from flops import counted_flops, deepmlf_step_flops
from helpers import make_batch, make_model


def _counted(model, batch) -> float:
    """PyTorch's count of one training forward + backward. (Evaluation is not compared: there
    `nn.TransformerEncoder` takes a fused fast path that PyTorch's registry does not count.)"""
    labels = torch.zeros(batch["layout"].batch_size)
    model.train()
    return counted_flops(lambda: deepmlf_loss(model(**batch), labels, model.cfg.loss)[0].backward())


@pytest.mark.parametrize("backbone, form, ffn_all_rows", [
    ("tiny-llama", "plain", True), ("tiny-llama", "absorbed", False), ("tiny-gpt2", "absorbed", True),
])
def test_formula_equals_pytorch_count(backbone, form, ffn_all_rows):
    model, tok = make_model(backbone, xattn_form=form, ffn_all_rows=ffn_all_rows, dropout=0.0)
    model.cfg.loss.w_clm = 1.0
    batch = make_batch(tok, texts=["word " * 9] * 3)
    assert batch["layout"].text_lengths.unique().numel() == 1  # equal lengths: nothing is padded
    formula = deepmlf_step_flops(model, batch["layout"], train=True)
    counted = _counted(model, batch)
    assert formula.total == pytest.approx(counted, rel=1e-3), (formula.parts, counted)
