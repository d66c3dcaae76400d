"""One table per decoder architecture: where its parts live inside a Hugging Face model.

DeepMLF needs to reach into a frozen causal LM: its token embedding, position
handling, decoder blocks, FFN weights (to initialise MM-block FFNs), final norm and
LM head. `ArchSpec` states those locations declaratively, so supporting another
family is one more table entry, not string tests scattered through the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deepmlf_fast.errors import BackboneError


@dataclass(frozen=True)
class ArchSpec:
    """Locations and conventions of one decoder family (attribute paths from the CausalLM)."""

    base: str
    """Attribute of the CausalLM holding the base model."""
    layers: str
    embed_tokens: str
    position_table: str | None
    """Learned absolute position table (GPT-2 `wpe`), or None for rotary models."""
    rotary: str | None
    final_norm: str
    norm: Literal["layernorm", "rmsnorm"]
    norm_eps_attr: str
    official_mm_norm_eps: float
    """Epsilon of the official code's MM-block norms: its own LayerNorm (1e-5) for GPT-2, its
    `_LlamaRMSNorm` (1e-6) for the Llama family, whatever the wrapped LM uses."""
    ffn: Literal["mlp", "swiglu"]
    ffn_paths: tuple[str, ...]
    """Inside a decoder block: (fc_in, fc_out) for `mlp`, (gate, up, down) for `swiglu`."""
    act_attr: str
    embed_dropout_attr: str | None
    mm_ffn_dropout: bool
    """Whether the MM FFN ends with dropout (the official GPT-flavour MLP does, Llama's does not)."""


ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        base="transformer",
        layers="h",
        embed_tokens="wte",
        position_table="wpe",
        rotary=None,
        final_norm="ln_f",
        norm="layernorm",
        norm_eps_attr="layer_norm_epsilon",
        official_mm_norm_eps=1e-5,
        ffn="mlp",
        ffn_paths=("mlp.c_fc", "mlp.c_proj"),
        act_attr="activation_function",
        embed_dropout_attr="embd_pdrop",
        mm_ffn_dropout=True,
    ),
    "llama": ArchSpec(
        base="model",
        layers="layers",
        embed_tokens="embed_tokens",
        position_table=None,
        rotary="rotary_emb",
        final_norm="norm",
        norm="rmsnorm",
        norm_eps_attr="rms_norm_eps",
        official_mm_norm_eps=1e-6,
        ffn="swiglu",
        ffn_paths=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        act_attr="hidden_act",
        embed_dropout_attr=None,
        mm_ffn_dropout=False,
    ),
}

MODEL_TYPES: dict[str, str] = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}
"""HF `config.model_type` -> ARCHS key. Mistral and Qwen2 share Llama's layout."""


def arch_for(model_type: str) -> ArchSpec:
    """Return the ArchSpec of an HF `model_type`, or a BackboneError listing supported ones."""
    try:
        return ARCHS[MODEL_TYPES[model_type]]
    except KeyError:
        raise BackboneError(
            f"backbone architecture: model_type {model_type!r} is not supported; "
            f"supported model types are {sorted(MODEL_TYPES)}"
        ) from None


def get_path(root, path: str):
    """Follow a dotted attribute path ('mlp.c_fc') from `root`."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
