"""Quantize an already built model's linear layers with bitsandbytes.

Checkpoints are quantized while loading, through transformers' `BitsAndBytesConfig`.
A `--random-init` backbone has no checkpoint to load, so its random weights are
quantized here instead, with the same rules as transformers' bitsandbytes integration:
every `nn.Linear` (and GPT-2 `Conv1D`) of the decoder becomes a `Linear8bitLt` /
`Linear4bit` holding the same weights; the output embedding (`lm_head`), the input
embeddings, norms and any module named in `llm_int8_skip_modules` stay as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def quantize_linear_layers(model: nn.Module, quant_config, device: str | torch.device | None = None) -> nn.Module:
    """Replace `model`'s decoder linears, in place, by bitsandbytes layers on `device`.

    Args:
        model: a transformers causal LM (weights in any float dtype, on any device).
        quant_config: a `transformers.BitsAndBytesConfig` with `load_in_8bit` or `load_in_4bit`.
        device: where the quantized layers live (default CPU). Layers are converted one at
            a time, so peak memory is the model plus one layer's dense copy.
    Returns:
        `model`, with `Linear8bitLt` (LLM.int8: int8 weights, fp32 row scales, outlier
        threshold `llm_int8_threshold`) or `Linear4bit` (NF4/FP4, block size 64, optional
        double quantization, `bnb_4bit_quant_storage` element type) layers. Frozen.
    """
    device = torch.device(device or "cpu")
    skip = set(getattr(quant_config, "llm_int8_skip_modules", None) or [])
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # Names first, modules fetched one at a time: each replaced dense layer is freed at once.
    names = [n for n, m in model.named_modules() if m is not output and _is_linear(m) and not _skipped(n, skip)]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _quantized(model.get_submodule(name), quant_config, device))
    model.requires_grad_(False)
    return model


def _is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or type(module).__name__ == "Conv1D"


def _skipped(name: str, skip: set[str]) -> bool:
    return any(name == s or name.endswith(f".{s}") or f".{s}." in f".{name}." for s in skip)


def _quantized(module: nn.Module, quant_config, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    weight = module.weight.detach()
    if type(module).__name__ == "Conv1D":  # HF Conv1D stores (in, out)
        weight = weight.t()
    out_features, in_features = weight.shape
    # Int8Params quantizes only when moved off the host, so the dense copy starts on the CPU.
    weight = weight.to("cpu").contiguous()
    bias = module.bias
    if quant_config.load_in_8bit:
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=bias is not None, has_fp16_weights=False,
            threshold=quant_config.llm_int8_threshold, device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        kw = dict(
            compress_statistics=quant_config.bnb_4bit_use_double_quant, quant_type=quant_config.bnb_4bit_quant_type,
            quant_storage=quant_config.bnb_4bit_quant_storage,
        )
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=bias is not None, compute_dtype=quant_config.bnb_4bit_compute_dtype,
            device="meta", **kw,
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, module=layer, **kw)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu"), requires_grad=False)
    return layer.to(device)
