import pytest
import torch

from deepmlf_fast.ops.linear_cross_entropy import (
    IGNORE_INDEX,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("train_weight", [False, True])
def test_chunked_matches_reference_values_and_grads(chunk, train_weight):
    torch.manual_seed(0)
    h = torch.randn(13, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=train_weight)
    t = torch.randint(0, 50, (13,))
    t[[2, 5]] = IGNORE_INDEX
    ours = linear_cross_entropy(h, w, t, chunk_size=chunk)
    gh, *gw = torch.autograd.grad(3.0 * ours, [h, w] if train_weight else [h])
    ref = linear_cross_entropy_reference(h, w, t)
    rh, *rw = torch.autograd.grad(3.0 * ref, [h, w] if train_weight else [h])
    torch.testing.assert_close(ours, ref.float().to(ours.dtype), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    if train_weight:
        torch.testing.assert_close(gw[0], rw[0], rtol=1e-5, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_grad():
    h = torch.randn(4, 8, requires_grad=True)
    loss = linear_cross_entropy(h, torch.randn(10, 8), torch.full((4,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="targets must be"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long))
