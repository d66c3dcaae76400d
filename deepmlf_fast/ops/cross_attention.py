"""Gated cross-attention from a few query tokens to a narrow key/value sequence.

    out = x + gate(alpha) * dropout(W_o · MHA(q = norm(x) W_q^T, k = A W_k^T, v = A W_v^T))

with `x` the fusion tokens `(B, F, D)`, `A` the audiovisual sequence `(B, L, Dkv)` and
`[W_k; W_v] = w_kv` of shape `(2D, Dkv)`. Dkv (30 in DeepMLF) is far smaller than the
head dimension, so the op can evaluate it in two orders that compute the same function:

* **plain**: project K and V `(B, L, D)` and run ordinary multi-head attention;
* **absorbed**: fold the projections into per-head `(D, Dkv)` / `(Dkv, D)` matrices,
  `q~_h = norm(x) (W_q,h^T W_k,h)` and `y = sum_h (P_h A) (W_o,h W_v,h)^T`, so attention runs
  in the Dkv-wide space as multi-query attention whose single key/value head is A itself.
  K and V are never materialised and the two GEMMs shrink from D x D to D x (H*Dkv).

`choose_form` picks the cheaper order from the shapes. `gated_cross_attention` is the
public op (argument checks, dispatch); `gated_cross_attention_reference` the plain
PyTorch version with the same signature (CPU path, test oracle);
`gated_cross_attention_triton` the CUDA path, which wires two Triton launches
(`deepmlf_kernels`):

    norm, query projection          torch (F.layer_norm / F.rms_norm, one GEMM)
    [plain] K/V projection          torch (one GEMM; K and V are strided views of it)
    attention                       1 launch: varlen attention kernel, non-causal, one
                                    "sample" per batch row (cu_seqlens_q = b*F,
                                    cu_seqlens_k = b*L, seqused_k = av_lengths)
    output projection, dropout,     1 launch: gated-linear GEMM with fused epilogue
    gate, residual

In the absorbed form the kernel runs multi-query attention (Hkv = 1) whose single key =
value head is A itself (head dim Dkv = 30, padded to 32 in the kernel). The norm and query
projection are not fused into the attention kernel: they are cuBLAS GEMMs and cost less
than the launch they would save at F = 8-20.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from deepmlf_fast.ops.attention import sdpa_core
from deepmlf_fast.ops.dispatch import kernel_dtype, resolve_backend
from deepmlf_fast.ops.dropout import dropout
from deepmlf_fast.ops.gate import GATES, gate_value

NORMS = ("layernorm", "rmsnorm")
FORMS = ("auto", "plain", "absorbed")


def gated_cross_attention(
    x: torch.Tensor,
    av: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    w_q: torch.Tensor,
    w_kv: torch.Tensor,
    w_o: torch.Tensor,
    alpha: torch.Tensor,
    *,
    n_heads: int,
    norm: str = "layernorm",
    norm_eps: float = 1e-5,
    gate: str = "sigmoid",
    scale: float | None = None,
    av_lengths: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    resid_dropout_p: float = 0.0,
    form: str = "auto",
    backend: str = "auto",
) -> torch.Tensor:
    """Gated cross-attention with residual, as one op.

    Args:
        x: `(B, F, D)` query tokens (also the residual).
        av: `(B, L, Dkv)` key/value sequence; L may be 0.
        norm_weight, norm_bias: `(D,)` pre-norm parameters (`norm_bias` None for RMSNorm).
        w_q: `(D, D)`, w_kv: `(2D, Dkv)`, w_o: `(D, D)` in `nn.Linear` layout (out, in), no biases.
        alpha: `(1,)` scalar or `(D,)` per-channel gate parameter.
        n_heads: number of heads H; D % H == 0.
        norm: "layernorm" or "rmsnorm".
        gate: "sigmoid" or "tanh" nonlinearity applied to alpha.
        scale: softmax scale; default `1/sqrt(D/H)` (DeepMLF's official code uses `1/sqrt(D)`).
        av_lengths: optional `(B,)` number of valid AV steps per sample; steps past it are
            masked, and a sample with length 0 gets `out = x` and zero gradients.
        dropout_p: dropout on attention probabilities; resid_dropout_p: on the `W_o` output.
            Pass 0.0 at evaluation (the op does not look at `module.training`).
        form: "auto" | "plain" | "absorbed" evaluation order (same function).
        backend: "auto" | "triton" | "reference".

    Returns:
        `(B, F, D)` tensor in x's dtype.
    """
    _check(x, av, norm_weight, norm_bias, w_q, w_kv, w_o, alpha, n_heads, norm, gate, av_lengths, form)
    if form == "auto":
        form = choose_form(x.shape[0], x.shape[1], av.shape[1], x.shape[2], n_heads, av.shape[2])
    kwargs = dict(
        n_heads=n_heads, norm=norm, norm_eps=norm_eps, gate=gate, scale=scale, av_lengths=av_lengths,
        dropout_p=dropout_p, resid_dropout_p=resid_dropout_p, form=form,
    )
    if resolve_backend(backend, x, ("attention", "gated_linear"), "cross_attention") == "triton":
        return gated_cross_attention_triton(x, av, norm_weight, norm_bias, w_q, w_kv, w_o, alpha, **kwargs)
    return gated_cross_attention_reference(x, av, norm_weight, norm_bias, w_q, w_kv, w_o, alpha, **kwargs)


def gated_cross_attention_reference(
    x: torch.Tensor,
    av: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    w_q: torch.Tensor,
    w_kv: torch.Tensor,
    w_o: torch.Tensor,
    alpha: torch.Tensor,
    *,
    n_heads: int,
    norm: str = "layernorm",
    norm_eps: float = 1e-5,
    gate: str = "sigmoid",
    scale: float | None = None,
    av_lengths: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    resid_dropout_p: float = 0.0,
    form: str = "plain",
    attn_dropout_mask: torch.Tensor | None = None,
    resid_dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch `gated_cross_attention` (same arguments; "auto" form means "plain").

    `attn_dropout_mask` `(B, H, F, L)` and `resid_dropout_mask` `(B, F, D)` bool keep-masks
    replace random dropout when given (tests replay a kernel's dropout with them).
    """
    bsz, n_q, dim = x.shape
    n_kv, dkv = av.shape[1], av.shape[2]
    head_dim = dim // n_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    xn = normalize(x, norm_weight, norm_bias, norm, norm_eps)

    visible = torch.ones(bsz, n_kv, dtype=torch.bool, device=x.device)
    if av_lengths is not None:
        visible = torch.arange(n_kv, device=x.device)[None, :] < av_lengths[:, None]
    has_key = visible.any(-1)  # (B,)
    # Rows that see nothing get key 0 unmasked (no NaN) and their output zeroed.
    safe = visible.clone()
    if n_kv > 0:
        safe[:, 0] |= ~has_key

    if form == "absorbed":
        m_q, n_o = absorbed_weights(w_q, w_kv, w_o, n_heads)  # (D, H*Dkv), (H*Dkv, D)
        q_t = (xn @ m_q).view(bsz, n_q, n_heads, dkv).transpose(1, 2)  # (B, H, F, Dkv)
        keys = values = av[:, None]  # (B, 1, L, Dkv) shared by all heads
    else:
        q_t = (xn @ w_q.t()).view(bsz, n_q, n_heads, head_dim).transpose(1, 2)  # (B, H, F, Dh)
        kv = av @ w_kv.t()  # (B, L, 2D)
        keys = kv[..., :dim].reshape(bsz, n_kv, n_heads, head_dim).transpose(1, 2)  # (B, H, L, Dh)
        values = kv[..., dim:].reshape(bsz, n_kv, n_heads, head_dim).transpose(1, 2)

    if attn_dropout_mask is None and sdpa_core(x):
        ctx = F.scaled_dot_product_attention(q_t, keys, values, attn_mask=safe[:, None, None, :], dropout_p=dropout_p,
                                             scale=scale, enable_gqa=form == "absorbed")  # (B, H, F, Dkv or Dh)
    else:
        scores = torch.matmul(q_t, keys.transpose(-1, -2)) * scale  # (B, H, F, L)
        scores = scores.masked_fill(~safe[:, None, None, :], float("-inf"))
        # softmax in fp32 at least, fp64 stays fp64 (gradcheck)
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(x.dtype)
        probs = _dropout(probs, dropout_p, attn_dropout_mask)
        ctx = torch.matmul(probs, values)  # (B, H, F, Dkv or Dh)
    ctx = ctx * has_key[:, None, None, None].to(ctx.dtype)
    ctx = ctx.transpose(1, 2).reshape(bsz, n_q, -1)  # (B, F, H*Dkv or D)
    y = ctx @ n_o if form == "absorbed" else ctx @ w_o.t()  # (B, F, D)
    y = _dropout(y, resid_dropout_p, resid_dropout_mask)
    return x + gate_value(alpha, gate).to(x.dtype) * y


def gated_cross_attention_triton(
    x: torch.Tensor,
    av: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    w_q: torch.Tensor,
    w_kv: torch.Tensor,
    w_o: torch.Tensor,
    alpha: torch.Tensor,
    *,
    n_heads: int,
    norm: str = "layernorm",
    norm_eps: float = 1e-5,
    gate: str = "sigmoid",
    scale: float | None = None,
    av_lengths: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    resid_dropout_p: float = 0.0,
    form: str = "plain",
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton `gated_cross_attention` (arguments and semantics as the public op; `form`
    must already be "plain" or "absorbed").

    `seed`: optional `(2,)` int64 tensor on x's device, the Philox seeds of the attention
    and residual dropout; drawn from torch's generator when None. Replay the masks with
    `gated_cross_attention_dropout_masks(seed, ...)`. Returns `(B, F, D)` in x's dtype.
    """
    from deepmlf_kernels.attention import new_seed, varlen_attention_triton
    from deepmlf_kernels.gated_linear import gated_linear

    bsz, n_q, dim = x.shape
    n_kv, dkv = av.shape[1], av.shape[2]
    head_dim = dim // n_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if seed is None and (dropout_p > 0.0 or resid_dropout_p > 0.0):
        seed = new_seed(x.device, 2)
    attn_seed, resid_seed = (None, None) if seed is None else (seed[0:1], seed[1:2])

    # The kernels take one dtype for q/k/v and for h/w: autocast's, when it is on (custom
    # ops are not autocast), else x's. The residual x keeps its own dtype.
    ct = kernel_dtype(x, x.dtype)
    xn = normalize(x, norm_weight, norm_bias, norm, norm_eps).to(ct)
    av = av.to(ct)
    if form == "absorbed":
        m_q, n_o = (w.to(ct) for w in absorbed_weights(w_q, w_kv, w_o, n_heads))  # (D, H*Dkv), (H*Dkv, D)
        q = (xn @ m_q).view(bsz * n_q, n_heads, dkv)  # (B*F, H, Dkv)
        k = v = av.reshape(bsz * n_kv, 1, dkv)  # (B*L, 1, Dkv): one kv head shared by all H
        w_out = n_o.t()  # (D, H*Dkv), nn.Linear layout
    elif form == "plain":
        q = (xn @ w_q.to(ct).t()).view(bsz * n_q, n_heads, head_dim)  # (B*F, H, Dh)
        kv = av @ w_kv.to(ct).t()  # (B, L, 2D)
        k = kv[..., :dim].reshape(bsz * n_kv, n_heads, head_dim)  # (B*L, H, Dh), strided view
        v = kv[..., dim:].reshape(bsz * n_kv, n_heads, head_dim)
        w_out = w_o.to(ct)
    else:
        raise ValueError(f"gated_cross_attention_triton: form must be 'plain' or 'absorbed', found {form!r}")

    steps = torch.arange(bsz + 1, dtype=torch.int32, device=x.device)
    ctx = varlen_attention_triton(
        q, k, v, steps * n_q, steps * n_kv, n_q, n_kv,
        causal=False, scale=scale, dropout_p=dropout_p, seqused_k=av_lengths, seed=attn_seed,
    )  # (B*F, H, Dh or Dkv)
    return gated_linear(x, ctx.view(bsz, n_q, -1), w_out, gate_value(alpha, gate), dropout_p=resid_dropout_p,
                        seed=resid_seed)


def gated_cross_attention_dropout_masks(
    seed: torch.Tensor, bsz: int, n_q: int, n_kv: int, dim: int, n_heads: int, dropout_p: float,
    resid_dropout_p: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The keep-masks `gated_cross_attention_triton(..., seed=seed)` applies: `attn_dropout_mask
    (B, H, F, L)` and `resid_dropout_mask (B, F, D)` bool (None where that dropout is off),
    ready for `gated_cross_attention_reference`."""
    from deepmlf_kernels.attention import attention_dropout_mask
    from deepmlf_kernels.gated_linear import gated_linear_dropout_mask

    attn = resid = None
    if dropout_p > 0.0:
        attn = attention_dropout_mask(seed[0:1], bsz, n_heads, n_q, n_kv, dropout_p)
    if resid_dropout_p > 0.0:
        resid = gated_linear_dropout_mask(seed[1:2], bsz * n_q, dim, resid_dropout_p).view(bsz, n_q, dim)
    return attn, resid


def choose_form(bsz: int, n_q: int, n_kv: int, dim: int, n_heads: int, dkv: int) -> str:
    """Pick the evaluation order with the smaller cost estimate (FLOPs plus bytes of K/V).

    plain:    Q and O projections (2*M*D*D each), K/V projection and attention in Dh space;
    absorbed: the two folds (2*D*D*Dkv each), both GEMMs in H*Dkv space, attention in Dkv.
    K/V bytes count as work because the plain order writes and re-reads them.
    """
    rows = bsz * n_q
    head_dim = dim // n_heads
    plain = 4 * rows * dim * dim + 4 * bsz * n_kv * dkv * dim + 4 * bsz * n_heads * n_q * n_kv * head_dim
    plain += 2 * 4 * bsz * n_kv * dim  # K and V written then read (counted as 4 flops per byte-ish element)
    absorbed = 4 * dim * dim * dkv + 4 * rows * dim * n_heads * dkv + 4 * bsz * n_heads * n_q * n_kv * dkv
    return "absorbed" if absorbed < plain else "plain"


def absorbed_weights(w_q: torch.Tensor, w_kv: torch.Tensor, w_o: torch.Tensor, n_heads: int):
    """Fold the projections into `M_q (D, H*Dkv)` and `N_o (H*Dkv, D)`.

    `M_q[:, h] = W_q,h^T W_k,h` maps normalised queries straight to per-head scores
    against A; `N_o[h] = W_v,h^T W_o,h^T` maps per-head `P_h A` straight to the output.
    """
    dim, dkv = w_q.shape[0], w_kv.shape[1]
    head_dim = dim // n_heads
    wq_h = w_q.view(n_heads, head_dim, dim)  # (H, Dh, D)
    wk_h = w_kv[:dim].view(n_heads, head_dim, dkv)  # (H, Dh, Dkv)
    wv_h = w_kv[dim:].view(n_heads, head_dim, dkv)
    wo_h = w_o.view(dim, n_heads, head_dim)  # (D, H, Dh)
    m_q = torch.einsum("hed,hek->dhk", wq_h, wk_h).reshape(dim, n_heads * dkv)
    n_o = torch.einsum("hek,dhe->hkd", wv_h, wo_h).reshape(n_heads * dkv, dim)
    return m_q, n_o


def normalize(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm: str, eps: float) -> torch.Tensor:
    """LayerNorm (with optional bias) or RMSNorm of `x (..., D)` over its last dimension."""
    if norm == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _dropout(t: torch.Tensor, p: float, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is not None:
        return t * keep.to(t.dtype) / (1.0 - p)
    return dropout(t, p)


def _check(x, av, norm_weight, norm_bias, w_q, w_kv, w_o, alpha, n_heads, norm, gate, av_lengths, form) -> None:
    if x.dim() != 3:
        raise ValueError(f"gated_cross_attention: x must be (B, F, D), found shape {tuple(x.shape)}")
    bsz, _, dim = x.shape
    if av.dim() != 3 or av.shape[0] != bsz:
        raise ValueError(f"gated_cross_attention: av must be ({bsz}, L, Dkv), found shape {tuple(av.shape)}")
    dkv = av.shape[2]
    if dim % n_heads != 0:
        raise ValueError(f"gated_cross_attention: D={dim} is not divisible by n_heads={n_heads}")
    expected = {"w_q": (dim, dim), "w_kv": (2 * dim, dkv), "w_o": (dim, dim), "norm_weight": (dim,)}
    found = {"w_q": w_q, "w_kv": w_kv, "w_o": w_o, "norm_weight": norm_weight}
    for name, shape in expected.items():
        if tuple(found[name].shape) != shape:
            raise ValueError(f"gated_cross_attention: {name} must be {shape}, found {tuple(found[name].shape)}")
    if norm_bias is not None and tuple(norm_bias.shape) != (dim,):
        raise ValueError(f"gated_cross_attention: norm_bias must be ({dim},), found {tuple(norm_bias.shape)}")
    if tuple(alpha.shape) not in ((1,), (dim,), ()):
        raise ValueError(f"gated_cross_attention: alpha must be (1,) or ({dim},), found {tuple(alpha.shape)}")
    if av_lengths is not None and tuple(av_lengths.shape) != (bsz,):
        raise ValueError(f"gated_cross_attention: av_lengths must be ({bsz},), found {tuple(av_lengths.shape)}")
    if norm not in NORMS:
        raise ValueError(f"gated_cross_attention: norm must be one of {NORMS}, found {norm!r}")
    if gate not in GATES:
        raise ValueError(f"gated_cross_attention: gate must be one of {GATES}, found {gate!r}")
    if form not in FORMS:
        raise ValueError(f"gated_cross_attention: form must be one of {FORMS}, found {form!r}")
