"""Backbone resolution and loading: presets, local directories, clear failures."""

from __future__ import annotations

import pytest
import torch

from deepmlf_fast.backbones import load as load_mod
from deepmlf_fast.backbones.arch import ARCHS, arch_for
from deepmlf_fast.backbones.load import load_backbone, resolve_backbone
from deepmlf_fast.errors import BackboneError


def test_unknown_backbone_lists_presets():
    with pytest.raises(BackboneError, match="no such preset.*tiny-gpt2"):
        resolve_backbone("no-such-model")


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(BackboneError, match="no such preset, local directory"):
        resolve_backbone(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="has no config.json"):
        resolve_backbone(str(tmp_path / "empty"))


def test_uncached_hub_preset_says_how_to_provide_it(monkeypatch):
    monkeypatch.setattr(load_mod, "_cached_hub_snapshot", lambda hub_id: None)
    with pytest.raises(BackboneError, match="huggingface-cli download meta-llama|huggyllama/llama-7b.*--random-init"):
        resolve_backbone("llama-7b")


def test_random_init_builds_the_preset_architecture_without_weights(monkeypatch):
    monkeypatch.setattr(load_mod, "_cached_hub_snapshot", lambda hub_id: None)
    bb = load_backbone("gpt2", random_init=True)
    lm = bb.lm
    assert bb.spec is ARCHS["gpt2"] and lm.config.n_layer == 12 and lm.config.n_embd == 768
    assert lm.config.vocab_size == len(bb.tokenizer) == 50257
    assert not any(p.requires_grad for p in lm.parameters())


def test_tiny_backbones_load_through_the_checkpoint_path(backbone):
    resolved = resolve_backbone(backbone)
    assert (resolved.path / "config.json").exists() and (resolved.path / "model.safetensors").exists()
    bb = load_backbone(str(resolved.path))  # same directory, as a user path
    assert bb.lm.config._attn_implementation == "deepmlf"
    assert bb.pad_id == bb.tokenizer.pad_token_id is not None


def test_local_checkpoint_and_preset_give_identical_logits():
    a = load_backbone("tiny-llama")
    b = load_backbone(str(resolve_backbone("tiny-llama").path))
    ids = a.tokenizer(["hello there"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(a.lm(ids).logits, b.lm(ids).logits)


def test_unsupported_architecture_is_named():
    with pytest.raises(BackboneError, match="model_type 'bert' is not supported"):
        arch_for("bert")


def test_pad_id_is_the_pad_token_else_eos():
    from deepmlf_fast.backbones.load import pad_token_id
    from deepmlf_fast.backbones.offline import gpt2_bpe_tokenizer

    tok = gpt2_bpe_tokenizer()
    assert tok.pad_token_id is None
    assert pad_token_id(tok) == 50256 == tok.pad_token_id  # GPT-2 has no pad token: pad := eos

    class NoSpecials:
        pad_token_id = eos_token_id = None
        name_or_path = "bare"

    with pytest.raises(BackboneError, match="tokenizer 'bare': expected a pad or eos token, found neither"):
        pad_token_id(NoSpecials())
