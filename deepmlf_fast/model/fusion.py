"""MM blocks (reference §1.7): gated cross-attention from the fusion tokens to the AV
sequence, then a gated FFN initialised from the wrapped LM block's FFN.

    H_f <- H_f + gate(a1) * XAttn(norm1(H_f), A)            (fusion rows only)
    H   <- H   + gate(a2) * FFN(norm2(H))                   (all rows if combine, else fusion rows)

Hidden states arrive packed `(N, D)` (see `model/packing.py`); `fusion_rows` names the
rows of the fusion tokens, sample-major, so `H[fusion_rows].view(B, n, D)` are they.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from transformers.activations import ACT2FN

from deepmlf_fast.backbones.arch import ArchSpec, get_path
from deepmlf_fast.backbones.weights import dense_linear
from deepmlf_fast.config import FusionConfig, ParityFlags
from deepmlf_fast.ops.cross_attention import gate_value, gated_cross_attention


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


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else nn.RMSNorm(dim, eps=eps)


class MMBlock(nn.Module):
    """One MM block: gated cross-attention (fusion rows -> A) and a gated FFN."""

    def __init__(
        self,
        dim: int,
        kv_dim: int,
        cfg: FusionConfig,
        ffn: nn.Module,
        norm: str,
        norm_eps: float,
        scale: float,
        ffn_dropout: float,
    ):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.gate = cfg.gate
        self.combine = cfg.combine
        self.attn_dropout = cfg.dropout
        self.form = cfg.xattn_form
        self.norm_kind = norm
        self.scale = scale
        self.ln_1 = make_norm(norm, dim, norm_eps)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.alpha_attn = nn.Parameter(torch.full((1,), float(cfg.gate_init)))
        self.ln_2 = make_norm(norm, dim, norm_eps)
        self.ffn = ffn
        self.ffn_dropout = nn.Dropout(ffn_dropout)
        self.alpha_ffn = nn.Parameter(torch.full((1,), float(cfg.ffn_gate_init)))
        self.backend = "auto"

    def cross_attend(self, h_f: torch.Tensor, av: torch.Tensor, av_lengths: torch.Tensor | None) -> torch.Tensor:
        """`(B, n, D)` fusion states -> gated cross-attention output `(B, n, D)` (residual included)."""
        dropout = self.attn_dropout if self.training else 0.0
        return gated_cross_attention(
            h_f, av.to(h_f.dtype), self.ln_1.weight, getattr(self.ln_1, "bias", None),
            self.q_proj.weight, self.kv_proj.weight, self.o_proj.weight, self.alpha_attn,
            n_heads=self.n_heads, norm=self.norm_kind, norm_eps=self.ln_1.eps, gate=self.gate,
            scale=self.scale, av_lengths=av_lengths, dropout_p=dropout, resid_dropout_p=dropout,
            form=self.form, backend=self.backend,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        fusion_rows: torch.Tensor,
        n_fusion: int,
        av: torch.Tensor,
        av_lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        """hidden `(N, D)` packed -> `(N, D)`; only fusion rows read A."""
        dim = hidden.shape[-1]
        h_f = hidden.index_select(0, fusion_rows).view(-1, n_fusion, dim)  # (B, n, D)
        h_f = self.cross_attend(h_f, av, av_lengths).reshape(-1, dim)
        hidden = hidden.index_copy(0, fusion_rows, h_f)
        gate = gate_value(self.alpha_ffn, self.gate).to(hidden.dtype)
        if self.combine:
            return hidden + gate * self.ffn_dropout(self.ffn(self.ln_2(hidden)))
        h_f = h_f + gate * self.ffn_dropout(self.ffn(self.ln_2(h_f)))
        return hidden.index_copy(0, fusion_rows, h_f)


def xattn_scale(dim: int, n_heads: int, flags: ParityFlags) -> float:
    """Softmax scale of MM cross-attention: 1/sqrt(head_dim), or the official 1/sqrt(D)."""
    return 1.0 / math.sqrt(dim if flags.xattn_scale == "model_dim" else dim // n_heads)
