"""Llama-3.2-Vision decoder (`mllama`): transformers' own code against the same model patched in place
by `apply_deepmlf_kernels_to_mllama` (gated cross-attention layers on the varlen kernel and the
gated-linear epilogue, self-attention through `attn_implementation="deepmlf"`).

Providers, same weights and inputs (shapes from `shapes.mllama_shapes`):

    transformers    MllamaTextModel as loaded (sdpa)
    deepmlf         the same module after apply_deepmlf_kernels_to_mllama (backend auto: Triton on
                    CUDA, the PyTorch reference on CPU, where this is a correctness-and-overhead check)

Inputs: token ids, the projected vision states `(B, tiles * tile_tokens, D)` and the processor's
cross-attention mask (BOS before the image; every second sample's last tile padding), prepared by
transformers (`_prepare_cross_attention_mask`), so the patched layers run two varlen launches.
Modes: `forward` (autograd recording on) and `fwd+bwd` (gradients of every weight and of the vision
states). Each provider's forward is checked against transformers' before it is timed.

GPU entry (the one-call check): `python -m pytest benchmarks/test_bench_mllama.py --benchmark-enable
--record --bench-device cuda` (bf16, the `full` shape: Llama-3.2-11B-Vision widths, 5 layers).
"""

from __future__ import annotations

import pytest
import torch

from shapes import MllamaShape

SUITE = "mllama"
PROVIDERS = ("transformers", "deepmlf")
MODES = ("forward", "fwd+bwd")


def build(shape: MllamaShape, device, dtype):
    """A random MllamaTextModel of the shape and its inputs (seeded: every provider gets the same)."""
    from transformers import MllamaTextConfig
    from transformers.models.mllama import modeling_mllama as hf

    cfg = MllamaTextConfig(
        vocab_size=1024, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        cross_attention_layers=list(shape.cross_layers), max_position_embeddings=max(2048, shape.text_len),
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = hf.MllamaTextModel(cfg).to(dtype)
    with torch.no_grad():  # open the gates (initialised closed) so both branches count
        for layer in model.layers:
            if isinstance(layer, hf.MllamaCrossAttentionDecoderLayer):
                layer.cross_attn_attn_gate.fill_(0.5)
                layer.cross_attn_mlp_gate.fill_(0.5)
    g = torch.Generator().manual_seed(1)
    b, s, n_k = shape.batch, shape.text_len, shape.tiles * shape.tile_tokens
    tiles = torch.zeros(b, s, 1, shape.tiles, dtype=torch.long)
    tiles[:, 1:] = 1  # BOS precedes the image
    tiles[1::2, 1:, :, -1] = 0  # a padding tile in every second sample
    mask, rows = hf._prepare_cross_attention_mask(tiles, shape.tile_tokens, dtype)
    inputs = dict(
        input_ids=torch.randint(3, 1024, (b, s), generator=g).to(device),
        cross_attention_states=(torch.randn(b, n_k, shape.hidden, generator=g) * 0.5).to(device, dtype),
        cross_attention_mask=mask.to(device), full_text_row_masked_out_mask=rows.to(device), use_cache=False,
    )
    return model, inputs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_mllama_decoder(mllama_shape: MllamaShape, provider: str, mode: str, bench_env, measure):
    from deepmlf_fast.integrations.mllama import apply_deepmlf_kernels_to_mllama

    device = bench_env.device.torch_device
    model, inputs = build(mllama_shape, device, bench_env.dtype)
    states = inputs["cross_attention_states"].requires_grad_(mode != "forward")
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    if provider == "deepmlf":
        apply_deepmlf_kernels_to_mllama(model)
        with torch.no_grad():
            got = model(**inputs).last_hidden_state
        tol = 1e-4 if bench_env.dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    params = [p for p in model.parameters() if p.requires_grad] + [states]
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(2)).to(device, want.dtype)

    def make_fn():
        if mode == "forward":
            return lambda: model(**inputs).last_hidden_state
        return lambda: torch.autograd.grad(model(**inputs).last_hidden_state, params, dout)

    measure(make_fn, suite=SUITE, provider=provider, mode=mode, shape=mllama_shape.key)
