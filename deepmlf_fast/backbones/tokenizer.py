"""DeepMLF's pad id, the one convention it imposes on every tokenizer (hub, local or offline).

`load_backbone` decides it once, when the tokenizer is loaded; data and model take it from the
`LoadedBackbone`. The offline builder writes it into a tiny backbone's config.
"""

from __future__ import annotations

from deepmlf_fast.errors import BackboneError


def pad_token_id(tokenizer) -> int:
    """DeepMLF's pad id: the tokenizer's pad token, else its EOS (GPT-2 has no pad token;
    the official code sets pad := EOS). Sets `tokenizer.pad_token` when it was missing."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise BackboneError(f"tokenizer {tokenizer.name_or_path!r}: expected a pad or eos token, found neither")
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id)
