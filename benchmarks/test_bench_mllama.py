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
states). Each provider's forward is checked against transformers' before it is timed; in `fwd+bwd`
every gradient the timed callable returns is checked once, outside the timing, against
transformers' in the benchmark dtype and in `BenchEnv.exact_dtype` (a copy of the model)
(the `check_gradients` fixture).

GPU entry (the one-call check): `python -m pytest benchmarks/test_bench_mllama.py --benchmark-enable
--record --bench-device cuda` (bf16, the `full` shape: Llama-3.2-11B-Vision widths, 5 layers).
"""

from __future__ import annotations

import copy

import pytest
import torch

from shapes import MllamaShape

SUITE = "mllama"
PROVIDERS = ("transformers", "deepmlf")
MODES = ("forward", "fwd+bwd")


def reference_gradients(model, inputs: dict, dout: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Gradients of transformers' model (not yet patched) in `dtype`: every trained weight, in
    `named_parameters` order, then the vision states. Weights and inputs are `model`'s and
    `inputs`' own values, cast (the model is copied when `dtype` is not its own)."""
    if dtype != dout.dtype:
        model = copy.deepcopy(model).to(dtype)
        inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    states = inputs["cross_attention_states"].detach().requires_grad_()
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(**dict(inputs, cross_attention_states=states)).last_hidden_state
    return list(torch.autograd.grad(out, [*params, states], dout.to(dtype)))


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
def test_mllama_decoder(mllama_shape: MllamaShape, provider: str, mode: str, bench_env, measure,
                        check_gradients):
    from deepmlf_fast.integrations.mllama import apply_deepmlf_kernels_to_mllama

    device = bench_env.device.torch_device
    model, inputs = build(mllama_shape, device, bench_env.dtype)
    states = inputs["cross_attention_states"].requires_grad_(mode != "forward")
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(2)).to(device, want.dtype)
    if mode != "forward":
        references = [reference_gradients(model, inputs, dout, dtype)
                      for dtype in (bench_env.dtype, bench_env.exact_dtype)]
    if provider == "deepmlf":
        apply_deepmlf_kernels_to_mllama(model)
        with torch.no_grad():
            got = model(**inputs).last_hidden_state
        tol = 1e-4 if bench_env.dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + [("cross_attention_states", states)]
    params = [p for _, p in named]

    def make_fn():
        if mode == "forward":
            return lambda: model(**inputs).last_hidden_state
        return lambda: torch.autograd.grad(model(**inputs).last_hidden_state, params, dout)

    if mode != "forward":  # the timed callable's gradients
        check_gradients(f"{provider} {mode}", [n for n, _ in named], make_fn()(), *references)
        del references
    measure(make_fn, suite=SUITE, provider=provider, mode=mode, shape=mllama_shape.key)
