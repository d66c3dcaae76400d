"""`ops.dropout`: torch's dropout distribution from a cheaper mask draw on CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from deepmlf_fast.ops.dropout import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_keeps_each_element_with_probability_one_minus_p_and_rescales(p, dtype):
    torch.manual_seed(0)
    x = torch.full((400, 1000), 2.0, dtype=dtype)
    y = dropout(x, p)
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    n = x.numel()
    # 6 binomial standard deviations: a wrong p (even by 0.005) fails, chance alone does not.
    assert abs(kept.sum().item() - n * (1 - p)) < 6 * math.sqrt(n * p * (1 - p))
    scaled = torch.tensor(2.0, dtype=dtype) * torch.tensor(1.0 / (1.0 - p), dtype=dtype)
    assert torch.equal(y[kept], scaled.expand(int(kept.sum())))


def test_gradient_is_the_mask_times_the_scale_and_draws_follow_the_seed():
    x = torch.randn(64, 33, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    y = dropout(x, 0.3)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, (y != 0).double() / 0.7)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.3), y)
    torch.manual_seed(8)
    assert not torch.equal(dropout(x, 0.3), y)


def test_no_op_outside_training_and_at_zero_and_all_dropped_at_one():
    x = torch.randn(5, 7)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))


def test_module_is_an_nn_dropout_with_the_same_p_and_mode():
    m = Dropout(0.25)
    assert isinstance(m, nn.Dropout) and m.p == 0.25 and m.state_dict() == {}
    x = torch.randn(8, 8)
    assert torch.equal(m.eval()(x), x)
    assert (m.train()(torch.ones(1000)) == 0).any()
