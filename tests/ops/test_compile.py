"""The ops under torch.compile(fullgraph=True) and torch.library's opcheck.

The Triton kernels are registered as opaque `torch.library.custom_op`s with fake
(meta) implementations and `register_autograd`, so Dynamo traces through them without a
graph break and Inductor calls them as they are. On CPU that call runs the interpreted
kernels, which works because the op is opaque (a `triton_op` would let Inductor look
inside the kernel, which fails on CPU tensors).
"""

from __future__ import annotations

import pytest
import torch

from deepmlf_fast.ops.attention import varlen_attention
from deepmlf_fast.ops.cross_attention import gated_cross_attention

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),  # opcheck
]


def _attention_inputs(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    q = torch.randn(12, 4, 16, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(12, 2, 16, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(12, 2, 16, generator=g).to(device, dtype).requires_grad_()
    return q, k, v, cu


def _cross_inputs(device):
    g = torch.Generator().manual_seed(0)
    dim, dkv = 32, 30
    shapes = dict(x=(2, 4, dim), av=(2, 6, dkv), norm_weight=(dim,), norm_bias=(dim,), w_q=(dim, dim),
                  w_kv=(2 * dim, dkv), w_o=(dim, dim), alpha=(dim,))
    return [(torch.randn(*s, generator=g) * 0.3).to(device).requires_grad_() for s in shapes.values()]


def _step(fn, inputs):
    out = fn(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    return out, grads


def _assert_same(eager, compiled):
    for a, b in zip((eager[0], *eager[1]), (compiled[0], *compiled[1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_reference_path_compiles_without_graph_breaks():
    q, k, v, cu = _attention_inputs("cpu")

    def attn(q, k, v):
        return varlen_attention(q, k, v, cu, cu, 7, 7, causal=True, backend="reference")

    def cross(*args):
        return gated_cross_attention(*args, n_heads=4, av_lengths=torch.tensor([6, 0]), form="absorbed",
                                     backend="reference")

    for fn, inputs in ((attn, (q, k, v)), (cross, _cross_inputs("cpu"))):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        _assert_same(_step(fn, inputs), _step(compiled, inputs))


def test_triton_custom_ops_compile_without_graph_breaks(device):
    """fullgraph=True through Inductor: attention and gated cross-attention with dropout,
    forward and backward. `fallback_random` makes Inductor draw the seeds as eager does."""
    torch._dynamo.reset()
    q, k, v, cu = _attention_inputs(device)

    def attn(q, k, v):
        return varlen_attention(q, k, v, cu, cu, 7, 7, causal=True, backend="triton")

    def cross(*args):
        return gated_cross_attention(*args, n_heads=4, av_lengths=torch.tensor([6, 0], device=device),
                                     dropout_p=0.1, resid_dropout_p=0.1, form="absorbed", backend="triton")

    with torch._inductor.config.patch(fallback_random=True):
        for fn, inputs in ((attn, (q, k, v)), (cross, _cross_inputs(device))):
            compiled = torch.compile(fn, fullgraph=True)
            torch.manual_seed(0)
            eager = _step(fn, inputs)
            torch.manual_seed(0)
            _assert_same(eager, _step(compiled, inputs))


def test_opcheck_attention_ops(device):
    import deepmlf_kernels.attention  # noqa: F401  (registers the ops)

    q, k, v, cu = _attention_inputs(device)
    used = torch.tensor([5, 3], dtype=torch.int32, device=device)
    seed = torch.tensor([3], dtype=torch.int64, device=device)
    fwd = torch.ops.deepmlf.varlen_attention_fwd.default
    torch.library.opcheck(fwd, (q, k, v, cu, cu, None, None, 7, 7, True, 0.25, 0.0))
    torch.library.opcheck(fwd, (q, k, v, cu, cu, used, seed, 7, 7, False, 0.25, 0.2))
    q, k, v = (t.detach() for t in (q, k, v))  # the backward op has no double backward
    out, lse = fwd(q, k, v, cu, cu, used, seed, 7, 7, False, 0.25, 0.2)
    torch.library.opcheck(
        torch.ops.deepmlf.varlen_attention_bwd.default,
        (torch.randn_like(out), q, k, v, out, lse, cu, cu, used, seed, 7, 7, False, 0.25, 0.2),
    )


def test_opcheck_gated_linear_ops(device):
    import deepmlf_kernels.gated_linear  # noqa: F401  (registers the ops)

    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(6, 24, generator=g).to(device), torch.randn(6, 16, generator=g).to(device)
    w, gate = torch.randn(24, 16, generator=g).to(device), torch.rand(24, generator=g).to(device)
    seed = torch.tensor([3], dtype=torch.int64, device=device)
    fwd = torch.ops.deepmlf.gated_linear_fwd.default
    for args in ((x, h, w, gate, None, 0.0), (x, h, w, gate[:1].clone(), seed, 0.1)):
        leaves = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                  for t in args]
        torch.library.opcheck(fwd, tuple(leaves))
    out, y = fwd(x, h, w, gate, seed, 0.1)
    torch.library.opcheck(torch.ops.deepmlf.gated_linear_bwd.default, (torch.randn_like(out), y, gate, seed, 0.1))
