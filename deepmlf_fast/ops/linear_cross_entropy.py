"""Cross-entropy of `h @ W^T` without materialising the `(N, V)` logits.

The causal-LM term of DeepMLF projects every text row onto the whole vocabulary
(50k-130k); the official code keeps `(B, L+n, V)` fp32 logits and their gradient alive
(~400 MB at GPT-2 base, batch 32). Here rows are processed in chunks: each chunk's logits
are formed, reduced to its loss and its gradient with respect to `h` (and `W` when it is
trained), and freed, so peak extra memory is one `(chunk, V)` block. The gradient is
computed in the forward pass and scaled by the incoming gradient in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Mean token cross-entropy of `hidden (N, D) @ weight (V, D)^T` against `targets (N,)`.

    Targets equal to `ignore_index` do not count; with none counted the loss is 0.
    Computes in float32 whatever the input dtype. Differentiable w.r.t. `hidden`, and
    w.r.t. `weight` when it requires grad.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden (N, D) and weight (V, D) expected, found "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets must be ({hidden.shape[0]},), found {tuple(targets.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_size)


def linear_cross_entropy_reference(hidden, weight, targets, *, ignore_index: int = IGNORE_INDEX, chunk_size: int = 1024):
    """Plain PyTorch version (materialises all logits); same signature and semantics."""
    logits = hidden.float() @ weight.float().t()
    if (targets != ignore_index).sum() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size):
        n = hidden.shape[0]
        count = (targets != ignore_index).sum().clamp_min(1).float()
        want_w = weight.requires_grad
        grad_h = torch.zeros_like(hidden, dtype=torch.float32)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        w32 = weight.float()
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size].float()  # (c, D)
            t = targets[start:start + chunk_size]
            valid = t != ignore_index
            logp = torch.log_softmax(h @ w32.t(), dim=-1)  # (c, V)
            safe_t = torch.where(valid, t, torch.zeros_like(t))
            scale = valid.float() / count  # (c,): 1/count on counted rows, 0 elsewhere
            total = total - (logp.gather(1, safe_t[:, None]).squeeze(1) * valid).sum()
            # d(loss)/d(logits) = (softmax - onehot) * scale; the row scale is applied to the
            # (c, D) products, not to the (c, V) block, which costs a full pass over it.
            g = logp.exp_()
            g.scatter_add_(1, safe_t[:, None], -torch.ones_like(scale)[:, None])
            grad_h[start:start + chunk_size] = (g @ w32) * scale[:, None]
            if want_w:
                grad_w += g.t() @ (h * scale[:, None])
        ctx.save_for_backward(grad_h, grad_w if want_w else torch.empty(0))
        ctx.want_w = want_w
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = (grad_h * grad_out).to(ctx.dtypes[0])
        dw = (grad_w * grad_out).to(ctx.dtypes[1]) if ctx.want_w else None
        return dh, dw, None, None, None
