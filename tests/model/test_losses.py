"""The stage-2 loss (`deepmlf_loss`) against the formula written out with plain torch ops:

    L = |y^ - y| + w_fusion * mean_k |y^_f,k - y| + w_av * |y^_av - y| + w_text * |y^_t - y| + w_clm * CE_text

with four distinct weights, none 1, so a dropped, swapped or unweighted term shows in the total,
in its gradients and in the reported parts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepmlf_fast.config import LossConfig
from deepmlf_fast.model.losses import CLMInputs, deepmlf_loss
from deepmlf_fast.ops.linear_cross_entropy import IGNORE_INDEX

WEIGHTS = dict(w_fusion=0.3, w_av=0.7, w_text=1.9, w_clm=0.5)


def _outputs(bsz: int = 5, n_fusion: int = 4, n_text: int = 11, dim: int = 8, vocab: int = 13) -> dict:
    """Random model outputs (leaves that require grad) and labels in MOSI's [-3, 3]."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    targets = torch.randint(0, vocab, (n_text,), generator=g)
    targets[[3, 7]] = IGNORE_INDEX  # rows with no next token
    out = {
        "pred": leaf(bsz, scale=2.0),
        "pred_fusion": leaf(bsz, n_fusion, scale=2.0),
        "pred_av": leaf(bsz, scale=2.0),
        "pred_text": leaf(bsz, scale=2.0),
        "clm": CLMInputs(hidden=leaf(n_text, dim), weight=leaf(vocab, dim), targets=targets),
    }
    labels = torch.rand(bsz, generator=g) * 6 - 3
    return out, labels


def _reference_parts(out: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each term by its definition: L1 means (the fusion term over every token of every sample)
    and, when `out` has CLM inputs, the token-mean cross-entropy of the full logits over the
    counted targets."""
    parts = {
        "task": (out["pred"] - labels).abs().mean(),
        "fusion": torch.stack([(out["pred_fusion"][:, k] - labels).abs().mean()
                               for k in range(out["pred_fusion"].shape[1])]).mean(),
        "av": F.l1_loss(out["pred_av"], labels),
        "text": F.l1_loss(out["pred_text"], labels),
    }
    if "clm" in out:
        clm = out["clm"]
        parts["clm"] = F.cross_entropy(clm.hidden @ clm.weight.t(), clm.targets, ignore_index=IGNORE_INDEX)
    return parts


def _grads(total: torch.Tensor, out: dict) -> list[torch.Tensor]:
    leaves = [out[k] for k in ("pred", "pred_fusion", "pred_av", "pred_text")] + [out["clm"].hidden, out["clm"].weight]
    return torch.autograd.grad(total, leaves)


def test_weighted_total_parts_and_gradients():
    """The total, each reported (detached) part and the gradient of every input are those of the
    formula with the weights 0.3 / 0.7 / 1.9 / 0.5."""
    out, labels = _outputs()
    total, parts = deepmlf_loss(out, labels, LossConfig(**WEIGHTS))
    ref = _reference_parts(out, labels)
    want = ref["task"] + sum(WEIGHTS[f"w_{k}"] * ref[k] for k in ("fusion", "av", "text", "clm"))
    assert parts.keys() == ref.keys()
    for key, value in ref.items():
        assert not parts[key].requires_grad, key
        torch.testing.assert_close(parts[key], value.detach(), rtol=1e-6, atol=1e-6, msg=key)
    torch.testing.assert_close(total, want, rtol=1e-6, atol=1e-6)
    # Each prediction's gradient carries its own weight: d|x - y|/dx = w * sign(x - y) / count.
    grads = _grads(total, out)
    for got, expected in zip(grads, _grads(want, out)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    for i, key in ((2, "w_av"), (3, "w_text")):
        torch.testing.assert_close(grads[i].abs(), torch.full_like(grads[i], WEIGHTS[key] / len(labels)))


@pytest.mark.parametrize("clm", ["w_clm=0", "no clm inputs"])
def test_clm_term_only_when_weighted_and_given(clm):
    """w_clm = 0 or a forward without CLM inputs (eval): no `clm` part, the four L1 terms only."""
    out, labels = _outputs()
    weights = dict(WEIGHTS, w_clm=0.0) if clm == "w_clm=0" else WEIGHTS
    if clm == "no clm inputs":
        del out["clm"]
    total, parts = deepmlf_loss(out, labels, LossConfig(**weights))
    ref = _reference_parts(out, labels)
    assert set(parts) == {"task", "fusion", "av", "text"}
    want = ref["task"] + sum(WEIGHTS[f"w_{k}"] * ref[k] for k in ("fusion", "av", "text"))
    torch.testing.assert_close(total, want, rtol=1e-6, atol=1e-6)
