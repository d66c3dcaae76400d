"""deepmlf-fast inside models you already have.

* `causal_lm`: `apply_deepmlf` / `revert_deepmlf` turn a loaded transformers causal LM (GPT-2,
  Llama, SmolLM2, Qwen2, Mistral; plain, bitsandbytes-quantized or peft-wrapped) into a DeepMLF
  model in place; `apply_fused_attention` / `revert_fused_attention` only swap its self-attention
  for deepmlf-fast's varlen attention.
* `mllama`: `apply_deepmlf_kernels_to_mllama` / `revert_deepmlf_kernels_to_mllama` run
  Llama-3.2-Vision's gated cross-attention layers and self-attention on deepmlf-fast's kernels.

A package rather than one module: each integration owns its model family's table and imports,
and the mllama one (which imports transformers' mllama code) loads only when used.
"""

from deepmlf_fast.integrations.causal_lm import (
    SUPPORTED_MODEL_TYPES,
    apply_deepmlf,
    apply_fused_attention,
    deepmlf_of,
    revert_deepmlf,
    revert_fused_attention,
)

_MLLAMA = ("apply_deepmlf_kernels_to_mllama", "revert_deepmlf_kernels_to_mllama", "MLLAMA_KERNELS")

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "apply_deepmlf",
    "apply_fused_attention",
    "deepmlf_of",
    "revert_deepmlf",
    "revert_fused_attention",
    *_MLLAMA,
]


def __getattr__(name: str):
    if name in _MLLAMA:
        from deepmlf_fast.integrations import mllama

        return getattr(mllama, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
