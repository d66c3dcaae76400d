"""The attention maps of the report are the fused op's own probabilities."""

from __future__ import annotations

import pytest
import torch

from deepmlf_fast.ops.gate import gate_value
from deepmlf_fast.report.attention import capture_mm_inputs, cross_attention_probs
from helpers import make_batch, make_model


@pytest.mark.parametrize("parity", ["corrected", "official"])  # softmax scale 1/sqrt(head_dim) or 1/sqrt(D)
def test_probabilities_reproduce_the_op_and_respect_the_length_mask(backbone, parity):
    model, tok = make_model(backbone, parity)
    model.eval()
    batch = make_batch(tok)
    with torch.no_grad(), capture_mm_inputs(model) as captured:
        model(**batch)
    assert set(captured) == set(model.mm_layers) and all(len(v) == 1 for v in captured.values())
    lengths = torch.tensor([12, 5, 0])  # full, partial, none
    for i in model.mm_layers:
        fusion, av, _ = captured[i][0]
        assert fusion.shape == (3, 4, model.lm.config.hidden_size)
        xattn = model.mm_blocks[str(i)].xattn
        p = cross_attention_probs(xattn, fusion, av, lengths)  # (B, H, F, L)
        assert torch.allclose(p[0].sum(-1), torch.ones(()), atol=1e-6)
        assert torch.allclose(p[1, ..., :5].sum(-1), torch.ones(()), atol=1e-6) and p[1, ..., 5:].abs().max() == 0
        assert p[2].abs().max() == 0  # no valid step: the op leaves these tokens unchanged
        # out = x + gate * (P V) W_o^T: the op's output rebuilt from these probabilities.
        dim, heads = fusion.shape[-1], xattn.n_heads
        with torch.no_grad():
            v = (av @ xattn.kv_proj.weight[dim:].t()).view(3, -1, heads, dim // heads).transpose(1, 2)
            y = (p @ v).transpose(1, 2).reshape(fusion.shape) @ xattn.o_proj.weight.t()
            expected = fusion + gate_value(xattn.gate.alpha, xattn.gate.kind) * y
            torch.testing.assert_close(xattn(fusion, av, lengths), expected, atol=1e-5, rtol=1e-5)
