"""Llama-3.2-Vision (`mllama`) on deepmlf-fast's kernels: a tiny random model, patched in place,
matches the unpatched one in outputs and every gradient (reference path; Triton under the
interpreter), with and without a cross-attention mask, including masks the varlen kernel
cannot express (the fallback); revert restores transformers' code exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama import modeling_mllama as hf

from deepmlf_fast.integrations.mllama import (
    FusedMllamaCrossAttentionDecoderLayer,
    apply_deepmlf_kernels_to_mllama,
    cross_attention_passes,
    revert_deepmlf_kernels_to_mllama,
)

PATCHES, TILES = 5, 2  # vision tokens per tile (a 2x2 grid of 14-pixel patches + CLS), tiles per image
B, S = 2, 7
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Triton runs compiled on CUDA, interpreted on the CPU (TRITON_INTERPRET=1, tests/conftest.py)."""


def tiny_mllama() -> MllamaForConditionalGeneration:
    cfg = MllamaConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                           intermediate_size=64, vision_output_dim=96, image_size=28, patch_size=14,
                           max_num_tiles=TILES, intermediate_layers_indices=[0, 1],
                           supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3],
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=127,
    )
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(cfg).to(DEVICE)
    with torch.no_grad():  # transformers initialises the gates closed; open them so the branches count
        for layer in model.model.language_model.layers:
            if isinstance(layer, hf.MllamaCrossAttentionDecoderLayer):
                layer.cross_attn_attn_gate.fill_(0.7)
                layer.cross_attn_mlp_gate.fill_(-0.4)
    return model


def inputs(mask: str) -> dict:
    """A batch of 2 (the second left-padded by 2) with one image ("none", "prefix") or two ("fallback").

    "prefix": the processor's layout: token 0 (BOS) precedes the image (a fully masked row, which
    transformers lets see every key); sample 0's image has both tiles, sample 1's one valid tile,
    so its rows see a 5-key prefix and its BOS all 10 keys (two varlen launches).
    "fallback": in sample 0 the last rows see image 2 only, not a key prefix: dense attention."""
    g = torch.Generator().manual_seed(1)
    n_img = 2 if mask == "fallback" else 1
    out = dict(
        input_ids=torch.randint(3, 120, (B, S), generator=g),
        attention_mask=torch.ones(B, S, dtype=torch.long),
        pixel_values=torch.randn(B, n_img, TILES, 3, 28, 28, generator=g),
        aspect_ratio_ids=torch.tensor([[2] * n_img, [1] * n_img]),
        aspect_ratio_mask=torch.tensor([[[1, 1]] * n_img, [[1, 0]] * n_img]),
    )
    out["attention_mask"][1, :2] = 0
    if mask != "none":
        xmask = torch.zeros(B, S, n_img, TILES, dtype=torch.long)
        xmask[0, 1:, 0, :] = 1
        xmask[1, 1:, 0, :1] = 1
        if mask == "fallback":
            xmask[0, 4:, 0, :] = 0
            xmask[0, 4:, 1, :] = 1
        out["cross_attention_mask"] = xmask
    return {k: v.to(DEVICE) for k, v in out.items()}


def run(model, batch):
    """Logits of the real tokens and the gradient of every parameter."""
    model.train()  # dropout is 0 in these configs; train mode exercises the training paths
    model.zero_grad(set_to_none=True)
    logits = model(**batch).logits[batch["attention_mask"].bool()]
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, atol):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-4)
    assert a[1].keys() == b[1].keys() and len(a[1]) > 50
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=atol, rtol=1e-3, msg=name)


@pytest.mark.parametrize("backend,mask", [("reference", "none"), ("reference", "prefix"), ("reference", "fallback"),
                                          ("triton", "prefix")])
def test_patched_mllama_matches_transformers_and_reverts_exactly(backend, mask):
    model = tiny_mllama()
    batch = inputs(mask)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    text = model.model.language_model
    want = run(model, batch)
    ref = want
    if mask == "none":
        # Without a mask transformers' sdpa path masks the cross-attention causally and drops the
        # image tokens past the text length (the module has no `is_causal = False`); eager computes
        # the intended function, every row seeing every image token, which the fused layer computes.
        text.set_attn_implementation("eager")
        ref = run(model, batch)
        text.set_attn_implementation("sdpa")
    apply_deepmlf_kernels_to_mllama(model, backend=backend)
    assert [type(layer) is FusedMllamaCrossAttentionDecoderLayer for layer in text.layers] == [0, 1, 0, 1]
    assert text.config._attn_implementation == "deepmlf"
    assert model.model.vision_model.config._attn_implementation == "sdpa"
    assert model.state_dict().keys() == keys.keys()
    assert_same(run(model, batch), ref, atol=2e-5 if backend == "triton" else 1e-5)
    revert_deepmlf_kernels_to_mllama(model)
    assert not any(isinstance(m, FusedMllamaCrossAttentionDecoderLayer) for m in model.modules())
    assert text.config._attn_implementation == "sdpa"
    got = run(model, batch)
    assert torch.equal(got[0], want[0]) and all(torch.equal(got[1][n], want[1][n]) for n in want[1])


def _prepared(mask: str):
    batch = inputs(mask)
    prepared, _ = hf._prepare_cross_attention_mask(batch["cross_attention_mask"].cpu(), PATCHES, torch.float32)
    return prepared


def test_masks_become_per_sample_key_prefixes_or_fall_back():
    n_k = TILES * PATCHES
    assert [p.seqused_k for p in cross_attention_passes(None, B, S, n_k, "cpu")] == [None]
    passes = cross_attention_passes(_prepared("prefix"), B, S, n_k, "cpu")
    # Launch 1: sample 0's rows (all see 10 keys), sample 1's rows 1..6 (5 keys); launch 2: sample 1's BOS (10 keys).
    assert [p.seqused_k.tolist() for p in passes] == [[10, 5], [0, 10]]
    assert [p.rows.tolist() for p in passes] == [list(range(S)) + list(range(S + 1, 2 * S)), [S]]
    assert [p.cu_seqlens_q.tolist() for p in passes] == [[0, 7, 13], [0, 0, 1]]
    assert cross_attention_passes(_prepared("fallback"), B, S, 2 * n_k, "cpu") is None
    bias = _prepared("prefix").clone()
    bias[0, 0, 3, 0] = -1.0  # a finite bias is no mask the kernel can express
    assert cross_attention_passes(bias, B, S, n_k, "cpu") is None


def test_generation_with_the_cross_attention_cache_is_unchanged():
    model = tiny_mllama().eval()
    batch = inputs("prefix")
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(**batch, **kw)
        apply_deepmlf_kernels_to_mllama(model, backend="reference")
        got = model.generate(**batch, **kw)
    assert torch.equal(got, want)


def test_only_mllama_models_are_patched():
    with pytest.raises(ValueError, match="expected an mllama model"):
        apply_deepmlf_kernels_to_mllama(torch.nn.Linear(2, 2))
