"""Dense copies of a frozen backbone's weights, whatever their storage.

MM-block FFNs start as copies of the wrapped LM block's FFN; that block may be an
`nn.Linear`, an HF `Conv1D` (GPT-2, (in, out) layout), a bitsandbytes 8-bit/4-bit layer, a
`WeightOnlyLinear` (int8 / FP8),
or any of those wrapped by a peft LoRA adapter (the adapter's delta is added, as merging it
would). `dense_linear` returns `(weight (out, in), bias (out,) or None)` in float32.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from deepmlf_fast.layers.weight_only import WeightOnlyLinear


def dense_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight `(out, in)` and bias of a linear-like module as fresh float32 tensors."""
    if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):  # peft LoRA wrapper
        weight, bias = dense_linear(module.base_layer)
        if not getattr(module, "merged", False):
            for name in module.active_adapters:
                delta = module.get_delta_weight(name).detach().float()
                # peft returns the delta in the base layer's layout: (in, out) for GPT-2's Conv1D.
                weight = weight + (delta.t() if getattr(module, "fan_in_fan_out", False) else delta)
        return weight, bias
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().float().clone()
    kind = type(module).__name__
    if kind == "Conv1D":
        return module.weight.detach().float().t().contiguous(), bias
    if isinstance(module, WeightOnlyLinear):
        return module.dequantized(torch.float32), bias
    if kind == "Linear8bitLt":
        return _dequantize_int8(module.weight), bias
    if kind in ("Linear4bit", "LinearNF4", "LinearFP4"):
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        return w.float().reshape(module.out_features, module.in_features).contiguous(), bias
    if isinstance(module, nn.Linear):
        return module.weight.detach().float().clone(), bias
    raise TypeError(f"cannot read dense weights from a {kind}")


def _dequantize_int8(weight) -> torch.Tensor:
    """LLM.int8 row-wise dequantisation: W = CB * SCB / 127."""
    scb = getattr(weight, "SCB", None)
    if scb is None:  # not quantized yet (still on the host before .cuda())
        return weight.detach().float().clone()
    return weight.data.float() * scb.float()[:, None] / 127.0
