"""Exact matrix-multiply FLOPs of one DeepMLF training step, written out once from the model's
shapes (`tests`: checked against `torch.utils.flop_counter.FlopCounterMode` on a real step).

What counts: every matrix product a packed, unpadded implementation of deepmlf-fast's step
must do (2 * m * n * k each); element-wise work (norms, activations, softmax, the optimizer) is
not counted, like every FLOP/s figure of a GEMM-bound step. Per part:

* forward: the AV encoder (projections, 3-layer encoders, fusion), every LM block on the rows
  it runs (text rows below the first MM block without autograd, fusion rows with it, all rows
  above), the MM blocks (cross-attention in the evaluation order the op picks, FFN on the rows
  it acts on), the heads, and the causal-LM head on the text rows when the term is on (its
  gradient with respect to the text states is formed in the same pass: 2 products);
* backward: input gradients of every product on the autograd path (the frozen LM's blocks from
  the first MM block up for all rows, below it for the fusion rows), weight gradients of every
  trained weight (MM blocks, AV encoder, heads); attention backward is 4 products (dP, dV, dQ,
  dK) over each sample's query x key rectangle.

Attention rectangles are per sample, full (q_len x k_len, causal or not), as FlashAttention-
style kernels and the reference path compute them; nothing is counted for padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from deepmlf_fast.data.packing import PackedLayout
from deepmlf_fast.ops.cross_attention import choose_form


@dataclass
class StepFlops:
    """FLOPs of one step, split into forward and backward, with a breakdown by part."""

    forward: float = 0.0
    backward: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def add(self, part: str, fwd: float, bwd: float = 0.0) -> None:
        self.forward += fwd
        self.backward += bwd
        self.parts[part] = self.parts.get(part, 0.0) + fwd + bwd


def _mm(m: float, k: float, n: float) -> float:
    return 2.0 * m * k * n


def _linear(rows: float, fan_in: int, fan_out: int, *, input_grad: bool, weight_grad: bool) -> tuple[float, float]:
    """(forward, backward) FLOPs of `rows x fan_in @ fan_in x fan_out`."""
    f = _mm(rows, fan_in, fan_out)
    return f, f * (int(input_grad) + int(weight_grad))


def _attention(pairs: float, head_dim: int, heads: int, grad: bool) -> tuple[float, float]:
    """`pairs` = sum over samples of q_len * k_len; QK^T and PV forward, 4 products backward."""
    f = 2 * _mm(pairs, head_dim, 1) * heads
    return f, 2 * f if grad else 0.0


def av_encoder_flops(model, batch: int, flops: StepFlops, grad: bool) -> None:
    """The AV encoder: per modality projection, encoder layers (MHA + FFN), then the fusion linear."""
    av = model.cfg.av
    steps, d = av.max_len, av.d_model
    rows = batch * steps
    for in_dim in (av.audio_dim, av.vision_dim):
        f, b = _linear(rows, in_dim, d, input_grad=False, weight_grad=grad)
        flops.add("av_encoder", f, b)
        for _ in range(av.n_layers):
            for fan_in, fan_out in ((d, 3 * d), (d, d), (d, av.ff_mult * d), (av.ff_mult * d, d)):
                f, b = _linear(rows, fan_in, fan_out, input_grad=grad, weight_grad=grad)
                flops.add("av_encoder", f, b)
            f, b = _attention(batch * steps * steps, d // av.n_heads, av.n_heads, grad)
            flops.add("av_encoder", f, b)
    f, b = _linear(rows, 2 * d, d, input_grad=grad, weight_grad=grad)
    flops.add("av_encoder", f, b)


def deepmlf_step_flops(model, layout: PackedLayout, *, train: bool = True, clm: bool | None = None) -> StepFlops:
    """FLOPs of one step of `model` (a DeepMLF) on a batch with `layout`: forward and, with
    `train`, the backward a training step needs. `clm`: the causal-LM term (default: on when
    training with `w_clm > 0`)."""
    cfg, lm_cfg = model.cfg, model.lm.config
    dim, n_layers = lm_cfg.hidden_size, lm_cfg.num_hidden_layers
    heads = lm_cfg.num_attention_heads
    head_dim = getattr(lm_cfg, "head_dim", None) or dim // heads
    kv_dim = (getattr(lm_cfg, "num_key_value_heads", None) or heads) * head_dim
    inner = getattr(lm_cfg, "intermediate_size", None) or getattr(lm_cfg, "n_inner", None) or 4 * dim
    swiglu = model.spec.ffn == "swiglu"
    lens = layout.text_lengths.double()
    bsz, n = layout.batch_size, layout.n_fusion
    n_text, n_fusion = float(lens.sum()), float(bsz * n)
    clm = train and cfg.loss.w_clm > 0 if clm is None else clm
    out = StepFlops()

    av_encoder_flops(model, bsz, out, train)

    def block(rows: float, pairs: float, grad: bool, part: str) -> None:
        """One frozen decoder block on `rows` rows; its attention covers `pairs` query-key pairs."""
        linears = [(dim, heads * head_dim), (dim, 2 * kv_dim), (heads * head_dim, dim)]
        linears += [(dim, inner), (dim, inner), (inner, dim)] if swiglu else [(dim, inner), (inner, dim)]
        for fan_in, fan_out in linears:
            f, b = _linear(rows, fan_in, fan_out, input_grad=grad, weight_grad=False)
            out.add(part, f, b)
        f, b = _attention(pairs, head_dim, heads, grad)
        out.add(part, f, b)

    full = float(((lens + n) ** 2).sum())
    split = -1
    if train and cfg.text_prefix_no_grad:
        split = model.mm_layers[0] if cfg.fusion.ffn_all_rows else n_layers - 1
    for i in range(n_layers):
        if i <= split:
            block(n_text, float((lens ** 2).sum()), False, "lm_text_prefix")
            block(n_fusion, float((n * (lens + n)).sum()), True, "lm_fusion_prefix")
        else:
            block(n_text + n_fusion, full, train, "lm")
    for i in model.mm_layers:
        mm_block_flops(model, model.mm_blocks[str(i)], bsz, n, n_text, out, train)
    for fan_in, fan_out, rows in ((dim, 1, bsz), (dim, 1, n_fusion), (cfg.av.d_model, 1, bsz),
                                  (2 * dim + cfg.av.d_model, cfg.head_hidden, bsz), (cfg.head_hidden, 1, bsz)):
        f, b = _linear(rows, fan_in, fan_out, input_grad=train, weight_grad=train)
        out.add("heads", f, b)
    if clm:
        out.add("clm_head", 2 * _mm(n_text, dim, lm_cfg.vocab_size))
    return out


def mm_block_flops(model, mm, bsz: int, n: int, n_text: float, out: StepFlops, train: bool) -> None:
    """One MM block: gated cross-attention on the fusion rows (in the evaluation order the op
    picks) and the FFN on the rows it acts on."""
    cfg = model.cfg
    xa = mm.xattn
    dim = xa.q_proj.weight.shape[0]
    dkv, steps, heads = cfg.av.d_model, cfg.av.max_len, xa.n_heads
    rows = float(bsz * n)
    form = xa.form if xa.form != "auto" else choose_form(bsz, n, steps, dim, heads, dkv)
    pairs = float(bsz * n * steps)
    g = dict(input_grad=train, weight_grad=train)
    if form == "absorbed":
        hd = heads * dkv
        fold = 2 * _mm(dim, dim // heads, dkv) * heads
        terms = [_linear(rows, dim, hd, **g), _linear(rows, hd, dim, **g), (fold, 2 * fold if train else 0.0),
                 _attention(pairs, dkv, heads, train)]
    else:
        terms = [_linear(rows, dim, dim, **g), _linear(bsz * steps, dkv, 2 * dim, input_grad=train, weight_grad=train),
                 _linear(rows, dim, dim, **g), _attention(pairs, dim // heads, heads, train)]
    for f, b in terms:
        out.add("mm_xattn", f, b)
    ffn_rows = n_text + rows if mm.ffn_all_rows else rows
    mlp = mm.ffn.mlp
    for lin in [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]:
        trained = lin.weight.requires_grad
        f, b = _linear(ffn_rows, lin.in_features, lin.out_features, input_grad=train, weight_grad=train and trained)
        out.add("mm_ffn", f, b)


class _CountFlops(TorchDispatchMode):
    """PyTorch's per-op FLOP formulas (`torch.utils.flop_counter`) summed over every op run.
    (FlopCounterMode itself also tracks modules, which fails on blocks run under no_grad.)"""

    def __init__(self):
        super().__init__()
        self.total = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs PyTorch counts while running `fn()` (matrix products, convolutions, SDPA; fused
    fast paths it has no formula for count 0): what an implementation actually computes."""
    with _CountFlops() as counter:
        fn()
    return counter.total
