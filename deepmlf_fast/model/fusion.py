"""MM blocks (reference §1.7): gated cross-attention from the fusion tokens to the AV
sequence, then a gated FFN initialised from the wrapped LM block's FFN.

    H_f <- H_f + gate(a1) * XAttn(norm1(H_f), A)            (fusion rows only)
    H   <- H   + gate(a2) * FFN(norm2(H))                   (all rows if ffn_all_rows, else fusion rows)

Hidden states arrive packed `(N, D)` (see `data/packing.py`); `fusion_rows` names the
rows of the fusion tokens, sample-major, so `H[fusion_rows].view(B, n, D)` are they.
The two halves are the public layers `GatedCrossAttention` and `GatedFFN`.
"""

from __future__ import annotations

import math

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
        read A `(B, L_av, d_av)`."""
        hidden = self.xattn(hidden, av, av_lengths, rows=fusion_rows)
        return self.ffn(hidden, rows=None if self.ffn_all_rows else fusion_rows)


def xattn_scale(dim: int, n_heads: int, flags: ParityFlags) -> float:
    """Softmax scale of MM cross-attention: 1/sqrt(head_dim), or the official 1/sqrt(D)."""
    return 1.0 / math.sqrt(dim if flags.xattn_scale == "model_dim" else dim // n_heads)
