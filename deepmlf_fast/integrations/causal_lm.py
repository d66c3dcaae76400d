"""DeepMLF, or only its fused attention, on a Hugging Face causal LM you already have.

    dm = apply_deepmlf(lm, config, tokenizer=tok)   # GPT-2, Llama, SmolLM2, Qwen2, Mistral; plain,
                                                    # LLM.int8 / NF4 (bitsandbytes) or peft-wrapped
    out = dm(**batch.model_inputs())                # DeepMLF's forward on a packed batch
    train_run(run_cfg, model=dm, tokenizer=tok)     # the `deepmlf train` loop (DeepSpeed included)
    revert_deepmlf(lm)                              # lm computes exactly what it did before

What `apply_deepmlf` changes on the model it is given (and `revert_deepmlf` undoes):
* a child module `deepmlf`: the project's own `DeepMLF` built around the model (fusion tokens,
  MM blocks after the chosen blocks, AV encoder and norm, heads);
* each chosen decoder block wrapped in a `FusionLayer` in the model's layer list (its
  state-dict keys unchanged), which runs the block and, inside DeepMLF's forward, its MM block;
  on ordinary calls it is the block. The DeepMLF keeps the LM as a
  plain attribute (`DeepMLF.detach_backbone`), so the module tree has no cycle: the model's
  `state_dict()` is its original keys plus `deepmlf.*`, `.to()` moves both, and DeepSpeed, given
  the DeepMLF, sees only what trains;
* every original parameter frozen (the flags are restored by revert);
* attention through `attn_implementation="deepmlf"` (`apply_fused_attention`), which DeepMLF's
  packed runner needs; on ordinary `model(input_ids, attention_mask)` calls it computes the
  same function as the implementation it replaces;
* GPT-2's Python `gelu_new` and `nn.Dropout` replaced by faster equivalents
  (`backbones.load.fuse_elementwise`), as the project's own loader does;
* `model.load_state_dict(original_state_dict, strict=True)` still works: a hook on `deepmlf`
  accepts a state dict that holds none of its keys (one holding only some of them is an error).

A peft-wrapped model is unwrapped to its transformers model (`get_base_model()`), which gets the
`deepmlf` child; its adapters are part of the frozen backbone.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch.nn as nn

from deepmlf_fast.backbones.arch import MODEL_TYPES, ArchSpec, arch_for, get_path
from deepmlf_fast.backbones.load import LoadedBackbone, fuse_elementwise, unfuse_elementwise
from deepmlf_fast.backbones.tokenizer import pad_token_id
from deepmlf_fast.config import ModelConfig
from deepmlf_fast.errors import BackboneError
from deepmlf_fast.model.build import build_deepmlf
from deepmlf_fast.model.deepmlf import DeepMLF
from deepmlf_fast.ops import hf_attention

ATTR = "deepmlf"
"""Name of the child module `apply_deepmlf` adds (its state-dict prefix)."""
SUPPORTED_MODEL_TYPES = tuple(sorted(MODEL_TYPES))


@dataclass
class _Applied:
    """What `apply_deepmlf` changed on one model, for `revert_deepmlf`."""

    requires_grad: dict[str, bool]
    hooks: list
    elementwise: list
    """`backbones.load.fuse_elementwise`' swaps."""


_ATTENTION: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
"""Models under `apply_fused_attention` -> the attention implementation they had before."""
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, _Applied]" = weakref.WeakKeyDictionary()


def unwrap_causal_lm(model: nn.Module) -> tuple[nn.Module, ArchSpec]:
    """The transformers causal LM inside `model` (a peft `PeftModel` is unwrapped) and its
    architecture table; BackboneError listing the supported model types otherwise."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None or not hasattr(base, "get_output_embeddings"):
        raise BackboneError(f"expected a transformers causal LM (model types {list(SUPPORTED_MODEL_TYPES)}), "
                            f"found a {type(model).__name__}")
    return base, arch_for(model_type)


def apply_fused_attention(model: nn.Module) -> nn.Module:
    """Run the self-attention of a supported causal LM (GPT-2, Llama, SmolLM2, Qwen2, Mistral;
    plain, quantized or peft-wrapped) on deepmlf-fast's varlen attention: Triton on CUDA, the
    PyTorch reference elsewhere. Weights, keys and outputs (up to rounding) are unchanged; this
    is transformers' own `set_attn_implementation("deepmlf")`, nothing is patched.

    Returns `model`. `revert_fused_attention` restores the previous implementation.
    """
    base, _ = unwrap_causal_lm(model)
    if base not in _ATTENTION:
        _ATTENTION[base] = base.config._attn_implementation
        base.set_attn_implementation(hf_attention.register())
    return model


def revert_fused_attention(model: nn.Module) -> nn.Module:
    """Give `model` back the attention implementation it had before `apply_fused_attention`."""
    base, _ = unwrap_causal_lm(model)
    previous = _ATTENTION.pop(base, None)
    if previous is None:
        raise ValueError(f"revert_fused_attention: this {type(base).__name__} has no fused attention applied")
    base.set_attn_implementation(previous)
    return model


def apply_deepmlf(model: nn.Module, config: ModelConfig, *, tokenizer=None, pad_id: int | None = None,
                  init_seed: int = 0, backend: str = "auto") -> DeepMLF:
    """Turn a loaded causal LM into a DeepMLF model in place; returns the `DeepMLF`, which is
    also `model.deepmlf` (`model.get_base_model().deepmlf` for a peft model).

    Args:
        model: a transformers causal LM of a supported family, possibly quantized with
            bitsandbytes (LLM.int8, NF4) or wrapped by peft (adapters on attention only: the MM
            blocks copy the FFN weights of their LM block, which an FFN adapter would change).
        config: the DeepMLF configuration (fusion tokens, MM layers, AV encoder, heads, loss);
            `config.backbone` is replaced by the model's `name_or_path` when it has one, so a
            run records where the backbone came from. Quantization fields are not read.
        tokenizer: decides the pad id (its pad token, else its EOS); or give `pad_id`.
        init_seed: seeds the new modules' initialisation (as `build_deepmlf`).
        backend: attention ops' backend ("auto", "triton", "reference").

    `dm.fusion_parameters()` lists what trains; `dm(**batch.model_inputs())` is DeepMLF's forward.
    """
    base, spec = unwrap_causal_lm(model)
    if base in _APPLIED:
        raise ValueError(f"apply_deepmlf: this {type(base).__name__} already has DeepMLF applied")
    if (tokenizer is None) == (pad_id is None):
        raise ValueError("apply_deepmlf: give exactly one of tokenizer= (its pad or EOS token) and pad_id=")
    if getattr(base.config, "_name_or_path", ""):
        config = dataclasses.replace(config, backbone=base.config._name_or_path)
    flags = {name: p.requires_grad for name, p in base.named_parameters()}
    base.requires_grad_(False)
    apply_fused_attention(base)
    elementwise = fuse_elementwise(base)
    try:
        pad = pad_token_id(tokenizer) if pad_id is None else pad_id
        dm, _ = build_deepmlf(config, init_seed=init_seed, backend=backend,
                              backbone=LoadedBackbone(base, tokenizer, spec, pad, config.backbone))
    except Exception:
        revert_fused_attention(base)
        unfuse_elementwise(elementwise)
        _restore_requires_grad(base, flags)
        raise
    dm.detach_backbone()
    base.add_module(ATTR, dm)
    tolerate = _TolerateAbsent()
    hooks = [dm.register_load_state_dict_pre_hook(tolerate.pre), dm.register_load_state_dict_post_hook(tolerate.post)]
    _APPLIED[base] = _Applied(flags, hooks, elementwise)
    return dm


def revert_deepmlf(model: nn.Module) -> nn.Module:
    """Undo `apply_deepmlf`: remove `deepmlf`, its hooks, the fused attention, and restore the
    parameters' `requires_grad` flags. The model's outputs are then bit-identical to before."""
    base, _ = unwrap_causal_lm(model)
    applied = _APPLIED.pop(base, None)
    if applied is None:
        raise ValueError(f"revert_deepmlf: this {type(base).__name__} has no DeepMLF applied")
    for hook in applied.hooks:
        hook.remove()
    base._modules.pop(ATTR).unbind_backbone()
    revert_fused_attention(base)
    unfuse_elementwise(applied.elementwise)
    _restore_requires_grad(base, applied.requires_grad)
    return model


def deepmlf_of(model: nn.Module) -> DeepMLF:
    """The `DeepMLF` that `apply_deepmlf` attached to `model`."""
    base, _ = unwrap_causal_lm(model)
    if base not in _APPLIED:
        raise ValueError(f"this {type(base).__name__} has no DeepMLF applied (call apply_deepmlf first)")
    return getattr(base, ATTR)


class _TolerateAbsent:
    """Load-state-dict hooks of the attached DeepMLF: a state dict without any `deepmlf.*` key
    (the model's original one) loads strictly, the DeepMLF keeping its current weights."""

    def __init__(self):
        self.absent: str | None = None
        """The DeepMLF's prefix during a load whose state dict has none of its keys."""

    def pre(self, module, state_dict, prefix, *args) -> None:
        # `state_dict` here holds only the keys under `prefix` (torch filters it per child).
        self.absent = prefix if not any(k.startswith(prefix) for k in state_dict) else None

    def post(self, module, incompatible) -> None:
        if self.absent is not None:
            prefix, self.absent = self.absent, None
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(prefix)]


def _restore_requires_grad(base: nn.Module, flags: dict[str, bool]) -> None:
    for name, p in base.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))
