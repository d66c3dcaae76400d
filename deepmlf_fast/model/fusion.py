"""Where fusion happens: MM blocks (reference §1.7) and the wrapper that runs one after the LM
block it follows.

    H_f <- H_f + gate(a1) * XAttn(norm1(H_f), A)            (fusion rows only)
    H   <- H   + gate(a2) * FFN(norm2(H))                   (all rows if ffn_all_rows, else fusion rows)

Hidden states arrive packed `(N, D)` (see `data/packing.py`); `FusionInputs.rows` names the
rows of the fusion tokens, sample-major, so `H[rows].view(B, n, D)` are they. The two halves
are the public layers `GatedCrossAttention` and `GatedFFN`; `FusionLayer` replaces LM block i
in the LM's own layer list, so the module tree shows where each MM block runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.activations import ACT2FN

from deepmlf_fast.backbones.arch import ArchSpec, get_path
from deepmlf_fast.backbones.weights import dense_linear
from deepmlf_fast.config import FusionConfig, ParityFlags
from deepmlf_fast.layers import GatedCrossAttention, GatedFFN


class MLP(nn.Module):
    """GPT-flavour FFN: fc_in -> act -> fc_out (biases)."""

    def __init__(self, dim: int, inner: int, act: nn.Module):
        super().__init__()
        self.fc_in = nn.Linear(dim, inner)
        self.act = act
        self.fc_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class SwiGLU(nn.Module):
    """Llama-flavour FFN: down(act(gate(x)) * up(x)); `additive=True` reproduces the official
    `down(act(gate(x)) + up(x))` bug."""

    def __init__(self, dim: int, inner: int, act: nn.Module, additive: bool = False, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inner, bias=bias)
        self.up_proj = nn.Linear(dim, inner, bias=bias)
        self.down_proj = nn.Linear(inner, dim, bias=bias)
        self.act = act
        self.additive = additive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.act(self.gate_proj(x)), self.up_proj(x)
        return self.down_proj(g + u if self.additive else g * u)


def ffn_from_block(block: nn.Module, spec: ArchSpec, lm_config, flags: ParityFlags) -> nn.Module:
    """A trainable FFN initialised from an LM block's FFN (weights, and biases unless official)."""
    modules = [get_path(block, p) for p in spec.ffn_paths]
    dense = [dense_linear(m) for m in modules]
    dim = dense[0][0].shape[1]
    inner = dense[0][0].shape[0]
    lm_act = getattr(lm_config, spec.act_attr)
    if spec.ffn == "mlp":
        official = flags.ffn_copy == "weights_only_exact_gelu"
        ffn = MLP(dim, inner, nn.GELU() if official else ACT2FN[lm_act])
        targets = [ffn.fc_in, ffn.fc_out]
        copy_bias = not official
    else:
        has_bias = dense[0][1] is not None
        ffn = SwiGLU(dim, inner, ACT2FN[lm_act], additive=flags.llama_ffn == "additive", bias=has_bias)
        targets = [ffn.gate_proj, ffn.up_proj, ffn.down_proj]
        copy_bias = True
    with torch.no_grad():
        for target, (w, b) in zip(targets, dense):
            target.weight.copy_(w)
            if copy_bias and b is not None:
                target.bias.copy_(b)
    return ffn


def add_lora(ffn: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    """Freeze the copied FFN and train LoRA adapters on its linears (through peft)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("fusion.lora_rank > 0 needs peft: pip install 'deepmlf-fast[lora]'") from None
    targets = [name for name, m in ffn.named_modules() if isinstance(m, nn.Linear)]
    ffn = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets), ffn)
    for name, p in ffn.named_parameters():
        p.requires_grad_("lora_" in name)
    return ffn


@dataclass(frozen=True)
class FusionInputs:
    """What the MM blocks of one pass read: `av (B, L_av, d_av)` after its norm, `av_lengths (B,)`
    valid steps or None, and `rows (B*n,)`, the fusion rows of this pass's packed hidden states."""

    av: torch.Tensor
    av_lengths: torch.Tensor | None
    rows: torch.Tensor

    def at(self, rows: torch.Tensor) -> "FusionInputs":
        """The same AV sequence for a pass whose fusion tokens sit on other rows."""
        return FusionInputs(self.av, self.av_lengths, rows)


class MMBlock(nn.Module):
    """One MM block: gated cross-attention (fusion rows -> A), then a gated FFN.

    `xattn` is a `GatedCrossAttention` (norm `ln_1` of the paper), `ffn` a `GatedFFN` around
    the FFN copied from the wrapped LM block; the FFN runs on every row or on the fusion rows
    only (`FusionConfig.ffn_all_rows`).
    """

    def __init__(self, dim: int, kv_dim: int, cfg: FusionConfig, mlp: nn.Module, norm: str, norm_eps: float,
                 scale: float, ffn_dropout: float):
        super().__init__()
        self.xattn = GatedCrossAttention(
            dim, kv_dim, cfg.n_heads, norm=norm, norm_eps=norm_eps, gate=cfg.gate, gate_init=cfg.gate_init,
            scale=scale, dropout=cfg.dropout, form=cfg.xattn_form,
        )
        self.ffn = GatedFFN(mlp, dim, norm=norm, norm_eps=norm_eps, gate=cfg.gate, gate_init=cfg.ffn_gate_init,
                            dropout=ffn_dropout)
        self.ffn_all_rows = cfg.ffn_all_rows

    def forward(self, hidden: torch.Tensor, fusion_rows: torch.Tensor, av: torch.Tensor,
                av_lengths: torch.Tensor | None) -> torch.Tensor:
        """hidden `(N, D)` packed -> `(N, D)`; only the fusion rows (`fusion_rows`, sample-major)
        read A `(B, L_av, d_av)`. The fusion rows are gathered once and written back once."""
        dim = hidden.shape[-1]
        fusion = self.xattn(hidden.index_select(0, fusion_rows).view(av.shape[0], -1, dim), av, av_lengths)
        fusion = fusion.reshape(-1, dim)  # (B*n, D)
        if self.ffn_all_rows:
            return self.ffn(hidden.index_copy(0, fusion_rows, fusion))
        return hidden.index_copy(0, fusion_rows, self.ffn(fusion))


class FusionLayer(nn.Module):
    """LM decoder block `layer` followed by its MM block, in the LM's own layer list.

    Called without `fusion` (the LM's own forward, the text rows' no-grad pass) it is `layer`.
    With `fusion`, the MM block runs on the block's output, in the MM block's (fp32 master)
    dtype. State-dict keys are the wrapped block's own (`layers.i.*`, no `layer.` level), so the
    LM saves and loads as before. The MM block is owned by `DeepMLF.mm_blocks` (its checkpoint
    keys, what ZeRO partitions, what the optimizer sees) and only referenced here; `extra_repr`
    names it, so printing the model shows where it runs.
    """

    def __init__(self, layer: nn.Module, mm: MMBlock, name: str):
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "mm", mm)  # a reference: DeepMLF owns it (see above)
        self.mm_name = name
        self.register_state_dict_post_hook(_drop_layer_prefix)
        self.register_load_state_dict_pre_hook(_add_layer_prefix)

    def forward(self, hidden_states: torch.Tensor, *args, fusion: FusionInputs | None = None, **kwargs):
        """`layer(hidden_states (1, N, D), ...)`, then, with `fusion`, the MM block on its output;
        returns what `layer` returns (a tensor or a tuple whose first item is the states)."""
        out = self.layer(hidden_states, *args, **kwargs)
        if fusion is None:
            return out
        if isinstance(out, tuple):
            return (self.fuse(out[0][0], fusion)[None], *out[1:])
        return self.fuse(out[0], fusion)[None]

    def fuse(self, hidden: torch.Tensor, fusion: FusionInputs) -> torch.Tensor:
        """The MM block alone on packed `hidden (N, D)` -> `(N, D)` in hidden's dtype."""
        weight_dtype = self.mm.xattn.q_proj.weight.dtype
        return self.mm(hidden.to(weight_dtype), fusion.rows, fusion.av, fusion.av_lengths).to(hidden.dtype)

    def __getattr__(self, name: str):
        # HF models read attributes of their decoder layers (`attention_type`, ...): the wrapped one's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_modules", {}).get("layer")
            if layer is None:  # half-built (unpickling): no wrapped block to ask yet
                raise
            return getattr(layer, name)

    def extra_repr(self) -> str:
        return f"mm={self.mm_name}"


def _drop_layer_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """`prefix.layer.k` -> `prefix.k`, keeping the keys' order."""
    inner = prefix + "layer."
    if not any(k.startswith(inner) for k in state_dict):
        return
    items = [(prefix + k[len(inner):] if k.startswith(inner) else k, v) for k, v in state_dict.items()]
    state_dict.clear()
    state_dict.update(items)


def _add_layer_prefix(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """`prefix.k` -> `prefix.layer.k` before a load (the inverse of `_drop_layer_prefix`)."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "layer.")]:
        state_dict[prefix + "layer." + key[len(prefix):]] = state_dict.pop(key)


def xattn_scale(dim: int, n_heads: int, flags: ParityFlags) -> float:
    """Softmax scale of MM cross-attention: 1/sqrt(head_dim), or the official 1/sqrt(D)."""
    return 1.0 / math.sqrt(dim if flags.xattn_scale == "model_dim" else dim // n_heads)
