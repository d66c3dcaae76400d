"""`apply_deepmlf` / `revert_deepmlf` / `apply_fused_attention` on models loaded the ordinary way
(`AutoModelForCausalLM.from_pretrained`, default attention): the applied model computes what the
project's own `DeepMLF` computes on the same weights, revert gives the original model back bit for
bit, the original state dict still loads strictly, and peft / bitsandbytes models work."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from deepmlf_fast.backbones.load import load_backbone, resolve_backbone
from deepmlf_fast.backbones.offline import smollm2_tokenizer
from deepmlf_fast.config import AVEncoderConfig, FusionConfig, LossConfig, ModelConfig, TextConfig
from deepmlf_fast.errors import BackboneError, ConfigError
from deepmlf_fast.integrations import (
    apply_deepmlf,
    apply_fused_attention,
    deepmlf_of,
    revert_deepmlf,
    revert_fused_attention,
)
from deepmlf_fast.model.deepmlf import DeepMLF
from deepmlf_fast.model.losses import deepmlf_loss

from helpers import make_batch

LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
LABELS = torch.tensor([1.0, -2.0, 0.5])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Local checkpoints of every supported family: the tiny GPT-2 / Llama presets, and small random
    Qwen2 (q/k/v biases) and Mistral (sliding-window config) models saved here."""
    paths = {name: str(resolve_backbone(f"tiny-{name}").path) for name in ("gpt2", "llama")}
    tok = smollm2_tokenizer()
    for family in ("qwen2", "mistral"):
        path = tmp_path_factory.mktemp(family)
        extra = {"sliding_window": 4096} if family == "mistral" else {}
        cfg = AutoConfig.for_model(family, vocab_size=len(tok), pad_token_id=tok.pad_token_id, **LLAMA_LIKE, **extra)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        paths[family] = str(path)
    return paths


def model_config(mm_layers=(1, 2), n_heads=4) -> ModelConfig:
    return ModelConfig(
        av=AVEncoderConfig(audio_dim=5, vision_dim=20, max_len=12),
        fusion=FusionConfig(n_tokens=4, mm_layers=mm_layers, n_heads=n_heads, dropout=0.1),
        text=TextConfig(max_tokens=16),
        loss=LossConfig(w_clm=1.0),
    )


def user_model(path: str, **kwargs):
    """What a user has: the model and tokenizer as transformers loads them."""
    return AutoModelForCausalLM.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path)


def run(model, batch, seed: int = 0):
    """A training-mode forward (dropout drawn from `seed`) and backward of every loss term;
    -> (outputs, gradients by parameter name)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch)
    loss, _ = deepmlf_loss(out, LABELS, model.cfg.loss)
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_run(a, b, atol=1e-6):
    (out_a, grads_a), (out_b, grads_b) = a, b
    for key in ("pred", "pred_text", "pred_fusion", "pred_av"):
        torch.testing.assert_close(out_a[key], out_b[key], atol=atol, rtol=1e-5, msg=key)
    torch.testing.assert_close(out_a["clm"].hidden, out_b["clm"].hidden, atol=atol, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=1e-4, msg=name)


def logits(model, tok) -> torch.Tensor:
    """Eval-mode logits of the real (not padding) positions of a padded batch."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(["a gripping, beautifully acted film", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**enc).logits[enc["attention_mask"].bool()]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral"])
def test_applied_model_computes_what_the_project_model_computes(family, checkpoints):
    cfg = model_config()
    bb = load_backbone(checkpoints[family])
    ours = DeepMLF(cfg, bb.lm, bb.spec, bb.pad_id, init_seed=3)
    lm, tok = user_model(checkpoints[family])
    assert lm.config._attn_implementation != "deepmlf"
    dm = apply_deepmlf(lm, cfg, tokenizer=tok, init_seed=3)
    assert dm is lm.deepmlf is deepmlf_of(lm) and dm.pad_id == bb.pad_id
    batch = make_batch(tok)
    # Train mode with the LM's own dropout (GPT-2's is 0.1): the same draws need the same modes.
    assert_same_run(run(ours, batch), run(dm, batch))
    assert {n for n, p in dm.named_parameters() if p.requires_grad} == {
        n for n, p in ours.named_parameters() if p.requires_grad}
    assert {id(p) for p in dm.fusion_parameters()} == {id(p) for p in lm.parameters() if p.requires_grad}
    assert lm.training and all(m.training for m in lm.modules())  # dm.train() reached the LM, and back


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_revert_gives_the_original_model_back_bit_for_bit(family, checkpoints):
    lm, tok = user_model(checkpoints[family])
    lm.lm_head.weight.requires_grad_(False)  # a flag apply must restore, not reset
    before = logits(lm, tok)
    flags = {n: p.requires_grad for n, p in lm.named_parameters()}
    dm = apply_deepmlf(lm, model_config(), tokenizer=tok)
    assert not any(p.requires_grad for n, p in lm.named_parameters() if not n.startswith("deepmlf."))
    torch.testing.assert_close(logits(lm, tok), before, atol=1e-5, rtol=1e-5)  # fused attention, same function
    run(dm, make_batch(tok))
    revert_deepmlf(lm)
    assert not hasattr(lm, "deepmlf") and lm.config._attn_implementation == "sdpa"
    assert {n: p.requires_grad for n, p in lm.named_parameters()} == flags
    assert torch.equal(logits(lm, tok), before)
    with pytest.raises(ValueError, match="no DeepMLF applied"):
        revert_deepmlf(lm)


def test_fused_attention_alone(checkpoints):
    lm, tok = user_model(checkpoints["llama"])
    before = logits(lm, tok)
    keys = set(lm.state_dict())
    assert apply_fused_attention(lm) is lm and lm.config._attn_implementation == "deepmlf"
    assert set(lm.state_dict()) == keys
    torch.testing.assert_close(logits(lm, tok), before, atol=1e-5, rtol=1e-5)
    revert_fused_attention(lm)
    assert torch.equal(logits(lm, tok), before)


def test_original_state_dict_loads_strictly_and_checkpoints_round_trip(checkpoints, tmp_path):
    lm, tok = user_model(checkpoints["gpt2"])
    original = {k: v.clone() for k, v in lm.state_dict().items()}
    dm = apply_deepmlf(lm, model_config(), tokenizer=tok, init_seed=1)
    tokens = dm.fusion_tokens.weight.detach().clone()
    assert set(lm.state_dict()) - set(original) == {f"deepmlf.{k}" for k in dm.state_dict()}
    lm.load_state_dict(original, strict=True)  # the DeepMLF keys are tolerated only when all absent
    assert torch.equal(dm.fusion_tokens.weight, tokens)
    partial = dict(original, **{"deepmlf.fusion_tokens.weight": tokens})
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*deepmlf\.mm_blocks"):
        lm.load_state_dict(partial, strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        lm.load_state_dict({k: v for k, v in original.items() if k != "lm_head.weight"}, strict=True)

    # Trained weights saved from one applied model load into a freshly applied one (other init).
    with torch.no_grad():
        dm.fusion_tokens.weight.add_(1.0)
    full = {k: v.clone() for k, v in lm.state_dict().items()}
    trained = dm.trained_state_dict()
    batch = make_batch(tok)
    want = dm.eval()(**batch)["pred"]
    for load in ("trained", "full"):
        fresh_lm, _ = user_model(checkpoints["gpt2"])
        fresh = apply_deepmlf(fresh_lm, model_config(), tokenizer=tok, init_seed=2)
        if load == "trained":
            fresh.load_trained_state_dict(trained)
        else:
            fresh_lm.load_state_dict(full, strict=True)
        torch.testing.assert_close(fresh.eval()(**batch)["pred"], want, atol=0, rtol=0)


def test_peft_wrapped_model(checkpoints):
    peft = pytest.importorskip("peft")
    cfg = model_config()

    def wrapped(targets):
        lm, tok = user_model(checkpoints["llama"])
        torch.manual_seed(0)
        model = peft.get_peft_model(lm, peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
        return model, tok

    model, tok = wrapped(["q_proj", "v_proj"])
    base = model.get_base_model()
    lora = {n for n, p in base.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    dm = apply_deepmlf(model, cfg, tokenizer=tok, init_seed=5)
    assert dm is base.deepmlf and not any(p.requires_grad for n, p in base.named_parameters() if "lora_" in n)
    # Same as the project's DeepMLF built around the adapted LM itself (the adapters change the LM).
    twin, _ = wrapped(["q_proj", "v_proj"])
    apply_fused_attention(twin)  # what load_backbone gives the project's own model
    ours = DeepMLF(cfg, twin.get_base_model().requires_grad_(False), dm.spec, dm.pad_id, init_seed=5)
    batch = make_batch(tok)
    assert_same_run(run(ours, batch), run(dm, batch))
    revert_deepmlf(model)
    assert {n for n, p in base.named_parameters() if p.requires_grad} == lora

    # An adapter on an FFN linear is part of the FFN the MM block copies: the copy is the merged weight.
    ffn_adapted, tok = wrapped(["up_proj"])
    dm = apply_deepmlf(ffn_adapted, cfg, tokenizer=tok)
    up = ffn_adapted.get_base_model().model.layers[1].mlp.up_proj
    merged = up.base_layer.weight + up.get_delta_weight("default")
    assert not torch.equal(merged, up.base_layer.weight)
    torch.testing.assert_close(dm.mm_blocks["1"].ffn.mlp.up_proj.weight, merged)


def test_bitsandbytes_8bit_model(checkpoints):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    cfg = model_config()
    path = checkpoints["llama"]
    bb = load_backbone(path, quant="llm-int8")
    ours = DeepMLF(cfg, bb.lm, bb.spec, bb.pad_id, init_seed=4)
    lm, tok = user_model(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": "cpu"})
    assert type(lm.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    dm = apply_deepmlf(lm, cfg, tokenizer=tok, init_seed=4)
    batch = make_batch(tok)
    assert_same_run(run(ours, batch), run(dm, batch))
    assert all(p.grad is None for n, p in lm.named_parameters() if not n.startswith("deepmlf."))


def test_unsupported_architecture_lists_the_supported_ones():
    cfg = AutoConfig.for_model("gpt_neox", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64)
    lm = AutoModelForCausalLM.from_config(cfg)
    for apply in (lambda: apply_deepmlf(lm, model_config(), pad_id=0), lambda: apply_fused_attention(lm)):
        with pytest.raises(BackboneError, match=r"'gpt_neox' is not supported.*\['gpt2', 'llama', 'mistral', 'qwen2'\]"):
            apply()
    assert not hasattr(lm, "deepmlf")


@pytest.mark.parametrize("bad", [dict(mm_layers=(1, 7)), dict(n_heads=5)])
def test_failed_apply_leaves_the_model_as_it_was(checkpoints, bad):
    """A configuration the DeepMLF rejects (an MM layer past the backbone's 3 blocks, MM heads
    that do not divide its width 64) fails inside `apply_deepmlf` after the backbone was frozen
    and its attention switched: every parameter gets its own flag back (one was off before, so
    a reset to True would show), the attention implementation is the original one, no module
    is added, the weights are untouched, and the model can then be applied normally."""
    lm, tok = user_model(checkpoints["llama"])
    lm.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in lm.named_parameters()}
    assert set(flags.values()) == {True, False}
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    modules = [(n, type(m)) for n, m in lm.named_modules()]
    attn = lm.config._attn_implementation
    before = logits(lm, tok)
    with pytest.raises(ConfigError, match="fusion.mm_layers" if "mm_layers" in bad else "fusion.n_heads"):
        apply_deepmlf(lm, model_config(**bad), tokenizer=tok)
    assert {n: p.requires_grad for n, p in lm.named_parameters()} == flags
    assert lm.config._attn_implementation == attn
    assert [(n, type(m)) for n, m in lm.named_modules()] == modules and not hasattr(lm, "deepmlf")
    after = lm.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(logits(lm, tok), before)
    dm = apply_deepmlf(lm, model_config(), tokenizer=tok)
    assert dm is deepmlf_of(lm) and lm.config._attn_implementation == "deepmlf"
    revert_deepmlf(lm)
    assert {n: p.requires_grad for n, p in lm.named_parameters()} == flags and lm.config._attn_implementation == attn
