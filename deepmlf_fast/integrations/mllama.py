"""deepmlf-fast's kernels inside Llama-3.2-Vision (transformers' `mllama`), weights and keys unchanged.

    apply_deepmlf_kernels_to_mllama(model)    # MllamaForConditionalGeneration, MllamaModel,
    ...                                       # MllamaForCausalLM or MllamaTextModel, loaded
    revert_deepmlf_kernels_to_mllama(model)   # back to transformers' own code, bit for bit

`MLLAMA_KERNELS` is the declarative table of what changes (Liger style: one row per swapped
module kind; an instance keeps its parameters, buffers, hooks and state-dict keys, only its
class or its config's attention implementation changes):

    MllamaCrossAttentionDecoderLayer -> FusedMllamaCrossAttentionDecoderLayer   (class swap)
        the gated cross-attention half on the varlen attention kernel, then `o_proj`,
        `tanh(cross_attn_attn_gate)` and the residual in one gated-linear GEMM launch; the
        gated MLP half is the layer's own modules
    MllamaTextModel -> attn_implementation "deepmlf"                           (the seam)
        the self-attention layers through transformers' AttentionInterface; nothing is patched

The cross-attention layer gets a forward of its own because no seam exposes the attention
context before `o_proj` (the projection, gate and residual are split between
`MllamaTextCrossAttention.forward` and the layer's forward); it calls the layer's modules
(norms, q/k/v projections, per-head q/k RMSNorms, the cross-attention KV cache, the MLP) and
computes the same function:

    h   = x + tanh(g_attn) * o_proj(softmax(q k^T * scale + mask) v)
    out = h + tanh(g_mlp) * row_mask * mlp(post_attention_layernorm(h))

The attention runs as packed varlen attention, keys = each sample's vision tokens, where the
cross-attention mask is expressible per sample: every query row sees a prefix of its
sample's keys (tiles past an image's aspect ratio are at the end; rows before the first image
are "fully masked", which transformers turns into "sees every key"). Rows of a sample with
different prefix lengths (typically: BOS sees all keys, the rest the valid tiles) go to
separate launches, one per distinct length. Any other mask (a later row that sees image 2
but not image 1, a finite bias, a row that sees nothing) falls back to the attention
implementation the model had, on the dense mask; the fused epilogue is used either way.
Without a cross-attention mask every row sees every image token (transformers' eager path; its
sdpa path masks the cross-attention causally there, the module having no `is_causal = False`).
No attention weights are returned (`output_attentions` records none for these layers).

IDEFICS (v1) is not in the table: its gated layer zeroes attention rows by a separate
`cross_attention_gate`, its attention module has optional q/k LayerNorms and its own mask
convention, and in transformers 5.17 its dropout reads `p=self.config`, so it would need a
second fused layer and a training path transformers itself cannot run.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.mllama import modeling_mllama as hf

from deepmlf_fast.ops import hf_attention
from deepmlf_fast.ops.attention import varlen_attention
from deepmlf_fast.ops.gated_linear import gated_residual_linear


@dataclass(frozen=True)
class AttentionPass:
    """One varlen launch of a cross-attention layer: some query rows of every sample, each
    sample's rows seeing the first `seqused_k[b]` of its keys."""

    rows: torch.Tensor | None
    """(Nq,) indices into the `(B*S)` query rows, sample-major; None: all rows, in order."""
    cu_seqlens_q: torch.Tensor
    """(B+1,) int32 starts of each sample's rows among `rows`."""
    max_seqlen_q: int
    seqused_k: torch.Tensor | None
    """(B,) int32 keys each sample's rows see; None: all of them."""


def cross_attention_passes(mask: torch.Tensor | None, bsz: int, n_q: int, n_k: int,
                           device: torch.device) -> list[AttentionPass] | None:
    """The varlen launches that compute attention under an additive cross-attention mask
    `(B, 1, S, K)` (0 = visible, <= the dtype's minimum = masked), or None when the mask is not
    a per-row key prefix (the caller falls back to dense attention). One host read per mask."""
    starts = torch.arange(bsz + 1, dtype=torch.int32, device=device)
    if mask is None:
        return [AttentionPass(None, starts * n_q, n_q, None)]
    if mask.shape != (bsz, 1, n_q, n_k):
        return None
    m = mask[:, 0]
    visible = m == 0
    n = visible.sum(-1)  # (B, S)
    ok = (visible | (m <= torch.finfo(m.dtype).min)).all()
    ok &= (visible == (torch.arange(n_k, device=m.device) < n[..., None])).all() & (n > 0).all()
    summary = torch.cat([ok.view(1).long(), n.flatten()]).cpu()  # the one host read
    if not bool(summary[0]):
        return None
    n = summary[1:].view(bsz, n_q)
    # Pass p takes each sample's rows with its p-th smallest distinct key count.
    rank = torch.stack([torch.unique(n[b], return_inverse=True)[1] for b in range(bsz)])
    passes = []
    for p in range(int(rank.max()) + 1):
        sel = rank == p
        counts = sel.sum(1, dtype=torch.int32)
        used = torch.where(sel, n, 0).amax(1).to(torch.int32)
        everyone = bool(sel.all())
        passes.append(AttentionPass(
            None if everyone else sel.flatten().nonzero().squeeze(1).to(device),
            torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0)).to(device),
            int(counts.max()),
            None if everyone and bool((used == n_k).all()) else used.to(device),
        ))
    return passes


class _PlanCache:
    """The last mask's passes: every cross-attention layer of a forward gets the same mask
    tensor, so the host read happens once per forward, not once per layer."""

    def __init__(self):
        self.mask = None
        self.version = -1
        self.key: tuple = ()
        self.passes = None

    def get(self, mask, bsz, n_q, n_k, device):
        key = (bsz, n_q, n_k, device)
        if mask is None or self.mask is None or self.mask() is not mask or mask._version != self.version \
                or self.key != key:
            self.passes = cross_attention_passes(mask, bsz, n_q, n_k, device)
            self.mask = None if mask is None else weakref.ref(mask)
            self.version = -1 if mask is None else mask._version
            self.key = key
        return self.passes


_PLANS = _PlanCache()


class FusedMllamaCrossAttentionDecoderLayer(hf.MllamaCrossAttentionDecoderLayer):
    """`MllamaCrossAttentionDecoderLayer` on deepmlf-fast's kernels (instances are converted in
    place by `apply_deepmlf_kernels_to_mllama`; never constructed directly). Same parameters,
    same keys, same function; see the module docstring."""

    deepmlf_backend = "auto"
    """Backend of the attention and the epilogue ("auto", "triton", "reference")."""
    deepmlf_fallback = "sdpa"
    """Attention implementation for masks the varlen kernel cannot express (the model's own)."""

    def forward(self, hidden_states, cross_attention_states, cross_attention_mask, attention_mask,
                full_text_row_masked_out_mask, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs) -> torch.Tensor:
        attn = self.cross_attn
        bsz, n_q, _ = hidden_states.shape
        x = self.input_layernorm(hidden_states)
        q = attn.q_norm(attn.q_proj(x).view(bsz, n_q, attn.num_heads, attn.head_dim).transpose(1, 2))
        k, v = self._keys_values(cross_attention_states, past_key_values, bsz)  # (B, Hkv, K, d)
        dropout = attn.dropout if attn.training else 0.0
        ctx = self._attention(q, k, v, cross_attention_mask, dropout, kwargs)  # (B, S, H*d)
        hidden_states = gated_residual_linear(hidden_states, ctx, attn.o_proj, self.cross_attn_attn_gate.tanh(),
                                              self.deepmlf_backend)
        mlp = self.mlp(self.post_attention_layernorm(hidden_states))
        if full_text_row_masked_out_mask is not None:
            mlp = full_text_row_masked_out_mask[:, 0] * mlp
        return hidden_states + self.cross_attn_mlp_gate.tanh() * mlp

    def _keys_values(self, states, cache, bsz: int):
        """Keys (k_norm applied) and values `(B, Hkv, K, d)`: from the vision states (any
        leading shape holding B samples' tokens), through the cross-attention cache when there
        is one (as `MllamaTextCrossAttention`)."""
        attn = self.cross_attn
        if states is not None:
            shape = (bsz, -1, attn.num_key_value_heads, attn.head_dim)
            k = attn.k_norm(attn.k_proj(states).view(shape).transpose(1, 2))
            v = attn.v_proj(states).view(shape).transpose(1, 2)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            return k, v
        if cache is not None and cache.get_seq_length() > 0:
            return cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        raise ValueError("Cross attention layer can't find neither `cross_attn_states` nor cached values for key/values!")

    def _attention(self, q, k, v, mask, dropout, kwargs) -> torch.Tensor:
        """q `(B, H, S, d)`, k/v `(B, Hkv, K, d)` -> context `(B, S, H*d)`."""
        attn = self.cross_attn
        bsz, n_heads, n_q, d = q.shape
        n_k = k.shape[2]
        passes = _PLANS.get(mask, bsz, n_q, n_k, q.device)
        if passes is None:
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.deepmlf_fallback, hf.eager_attention_forward)
            out, _ = fn(attn, q, k, v, mask, dropout=dropout, scaling=attn.scaling, **kwargs)
            return out.reshape(bsz, n_q, -1)
        q = q.transpose(1, 2).reshape(bsz * n_q, n_heads, d)
        k = k.transpose(1, 2).reshape(bsz * n_k, -1, d)
        v = v.transpose(1, 2).reshape(bsz * n_k, -1, d)
        cu_k = torch.arange(bsz + 1, dtype=torch.int32, device=q.device) * n_k
        ctx = None
        for p in passes:
            out = varlen_attention(
                q if p.rows is None else q.index_select(0, p.rows), k, v, p.cu_seqlens_q, cu_k, p.max_seqlen_q,
                n_k, causal=False, scale=attn.scaling, dropout_p=dropout, seqused_k=p.seqused_k,
                backend=self.deepmlf_backend,
            )
            if p.rows is None:
                ctx = out
            else:
                ctx = (out.new_zeros(bsz * n_q, n_heads, d) if ctx is None else ctx).index_copy(0, p.rows, out)
        return ctx.reshape(bsz, n_q, n_heads * d)


@dataclass(frozen=True)
class ModuleSwap:
    """Instances of `original` become `fused` (a subclass: same parameters and keys)."""

    original: type
    fused: type


@dataclass(frozen=True)
class AttentionSwap:
    """Models of type `model` run their attention interface under `implementation`."""

    model: type
    implementation: str


MLLAMA_KERNELS = (
    ModuleSwap(hf.MllamaCrossAttentionDecoderLayer, FusedMllamaCrossAttentionDecoderLayer),
    AttentionSwap(hf.MllamaTextModel, hf_attention.ATTN_NAME),
)
"""What `apply_deepmlf_kernels_to_mllama` changes (module docstring)."""

_APPLIED: "weakref.WeakKeyDictionary[nn.Module, dict[nn.Module, str]]" = weakref.WeakKeyDictionary()
"""Patched model -> {text model: the attention implementation it had}."""


def apply_deepmlf_kernels_to_mllama(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Run a loaded Llama-3.2-Vision model's decoder on deepmlf-fast's kernels (`MLLAMA_KERNELS`),
    in place: every weight, key and hook stays; outputs and gradients equal the original up to
    rounding. `backend`: "auto" (Triton on CUDA, the reference elsewhere), "triton", "reference".
    Returns `model`; `revert_deepmlf_kernels_to_mllama` restores transformers' code."""
    if model in _APPLIED:
        raise ValueError("apply_deepmlf_kernels_to_mllama: already applied to this model")
    modules = list(model.modules())
    if not any(isinstance(m, hf.MllamaTextModel) for m in modules):
        raise ValueError(f"apply_deepmlf_kernels_to_mllama: expected an mllama model (one holding a MllamaTextModel), "
                         f"found a {type(model).__name__}")
    name = hf_attention.register()
    previous = {}
    for swap in MLLAMA_KERNELS:
        for m in modules:
            if isinstance(swap, AttentionSwap) and isinstance(m, swap.model):
                previous[m] = m.config._attn_implementation
    for swap in MLLAMA_KERNELS:
        for m in modules:
            if isinstance(swap, ModuleSwap) and type(m) is swap.original:
                m.__class__ = swap.fused
                m.deepmlf_backend = backend
                # Masks the varlen kernel cannot express go to what the model used before.
                fallback = next((impl for tm, impl in previous.items() if tm.config is m.cross_attn.config), "sdpa")
                m.deepmlf_fallback = "sdpa" if fallback == name else fallback
            elif isinstance(swap, AttentionSwap) and isinstance(m, swap.model):
                m.set_attn_implementation(swap.implementation)
    _APPLIED[model] = previous
    return model


def revert_deepmlf_kernels_to_mllama(model: nn.Module) -> nn.Module:
    """Undo `apply_deepmlf_kernels_to_mllama`: original classes and attention implementations."""
    previous = _APPLIED.pop(model, None)
    if previous is None:
        raise ValueError("revert_deepmlf_kernels_to_mllama: not applied to this model")
    for m in model.modules():
        for swap in MLLAMA_KERNELS:
            if isinstance(swap, ModuleSwap) and type(m) is swap.fused:
                m.__class__ = swap.original
                del m.deepmlf_backend, m.deepmlf_fallback
    for text_model, impl in previous.items():
        text_model.set_attn_implementation(impl)
    return model
