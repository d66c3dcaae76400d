"""Quantize a frozen backbone's decoder linears: the `--quant` methods.

| method | weights | product | from |
|---|---|---|---|
| `llm-int8` | int8 + fp32 row scale, outlier columns in 16-bit | bitsandbytes `Linear8bitLt` | LLM.int8 |
| `nf4` | 4-bit NormalFloat, double-quantized block absmax | bitsandbytes `Linear4bit` | QLoRA |
| `int8-weight-only` | int8 + fp32 row scale | dense GEMM on dequantized blocks | `layers.WeightOnlyLinear` |
| `fp8` | e4m3 + fp32 row scale | FP8 GEMM (CUDA sm_90+), else as above | `layers.WeightOnlyLinear` |
| `int8-dynamic` | int8 + fp32 row scale | activations int8 per row, int8 GEMM (int32 sums) | `layers.Int8DynamicLinear` |

Checkpoints loaded with a bitsandbytes method are quantized while loading, through
transformers' `BitsAndBytesConfig`; every other build (random weights, the torch-only
methods) quantizes here, one decoder layer at a time, with transformers' rules: every
`nn.Linear` (and GPT-2 `Conv1D`) of the decoder is replaced; the output embedding
(`lm_head`), the input embeddings, norms and any module named in `skip_modules` /
`llm_int8_skip_modules` stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from deepmlf_fast.config import choices
from deepmlf_fast.errors import BackboneError
from deepmlf_fast.layers.weight_only import Int8DynamicLinear, WeightOnlyLinear

WHOLE_WEIGHT_COPIES = ("llm-int8", "nf4")
"""Methods whose CPU training products make a dense copy of each whole weight per call
(bitsandbytes' `MatMul8bitFp` and 4-bit path: 33-90 MB per linear at 7B). With freed memory kept
in glibc's heap (`host.keep_freed_memory`) those copies and the activations saved between
them fragment it: the issue-19 7B LLM.int8 run peaked at 22.9 GiB with it and 13.5 GiB without
(the estimate: 13.5), its epoch at 70 s against 213 s. A CPU run with these methods returns
freed memory to the kernel (`train.run.Session`): a 7B run must fit the machine first."""


@dataclass(frozen=True)
class TorchQuantConfig:
    """A torch-only method (this package's own 8-bit layers, no bitsandbytes): `fmt` of
    `ops.weight_only.FORMATS`, `dynamic` for activations quantized per row too
    (`Int8DynamicLinear`), modules left dense by name."""

    fmt: str
    dynamic: bool = False
    skip_modules: tuple[str, ...] = ()

    @property
    def layer(self) -> type[WeightOnlyLinear]:
        """The layer class this method builds."""
        return Int8DynamicLinear if self.dynamic else WeightOnlyLinear


TORCH_METHODS = {"int8-weight-only": TorchQuantConfig("int8"), "fp8": TorchQuantConfig("fp8"),
               "int8-dynamic": TorchQuantConfig("int8", dynamic=True)}
"""`--quant` method (`config.QuantName`) -> its configuration, for the methods built here."""


def quantization_config(method: str, dtype: torch.dtype):
    """`--quant` method -> its configuration: None for "none", a `TorchQuantConfig`, or a
    `transformers.BitsAndBytesConfig` (bitsandbytes must be installed)."""
    known = choices("model.quant")
    if method not in known:
        raise BackboneError(f"model.quant: expected one of {list(known)}, found {method!r}")
    if method == "none":
        return None
    if method in TORCH_METHODS:
        return TORCH_METHODS[method]
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise BackboneError(
            f"model.quant: {method!r} needs bitsandbytes (pip install 'deepmlf-fast[quant]'); "
            f"{', '.join(repr(m) for m in TORCH_METHODS)} need nothing beyond torch"
        ) from None
    if method == "llm-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=storage,
    )


def quantize_linear_layers(model: nn.Module, quant_config, device: str | torch.device | None = None,
                           prepared: dict[str, nn.Module] | None = None) -> nn.Module:
    """Replace `model`'s decoder linears, in place, by quantized layers on `device`.

    Args:
        model: a transformers causal LM, or one of its decoder layers (weights in any float dtype).
        quant_config: a `TorchQuantConfig` or a `transformers.BitsAndBytesConfig` with
            `load_in_8bit` or `load_in_4bit`.
        device: where the quantized layers live (default CPU). Layers are converted one at
            a time, so peak memory is the model plus one layer's dense copy.
        prepared: `prepare_torch_layers`'s empty layers for these linears, to fill instead of
            allocating new ones.
    Returns:
        `model`, with `WeightOnlyLinear` / `Int8DynamicLinear`, `Linear8bitLt` (LLM.int8: int8 weights, fp32 row
        scales, outlier threshold `llm_int8_threshold`) or `Linear4bit` (NF4/FP4, block size 64,
        optional double quantization, `bnb_4bit_quant_storage` element type) layers. Frozen.
    """
    device = torch.device(device or "cpu")
    skip = set(getattr(quant_config, "skip_modules", None) or getattr(quant_config, "llm_int8_skip_modules", None)
               or [])
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # Names first, modules fetched one at a time: each replaced dense layer is freed at once.
    names = _quantizable(model, skip, output)
    for name in names:
        parent, _, child = name.rpartition(".")
        dense = model.get_submodule(name)
        quantized = prepared[name].quantize_from(dense) if prepared else _quantized(dense, quant_config, device)
        setattr(model.get_submodule(parent), child, quantized)
    model.requires_grad_(False)
    return model


def prepare_torch_layers(module: nn.Module, quant_config: TorchQuantConfig, device: torch.device) -> dict[str, nn.Module]:
    """Empty `WeightOnlyLinear`s (or `Int8DynamicLinear`s), allocated now on `device`, for the linears `quantize_linear_layers`
    would replace in `module` (which may still be on the meta device): `{name: layer}`.

    Allocating a layer's 8-bit storage before its dense weights keeps the heap from fragmenting
    when a model is built layer by layer: each dense layer is then the newest allocation and its
    space, freed, is reused whole by the next one (glibc keeps freed memory once
    `host.keep_freed_memory` ran; without this order the build's peak crept up by a layer
    every ten or so)."""
    return {name: quant_config.layer.empty_like(module.get_submodule(name), quant_config.fmt, device)
            for name in _quantizable(module, set(quant_config.skip_modules), None)}


def _quantizable(model: nn.Module, skip: set[str], output: nn.Module | None) -> list[str]:
    return [n for n, m in model.named_modules() if m is not output and _is_linear(m) and not _skipped(n, skip)]


def _is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or type(module).__name__ == "Conv1D"


def _skipped(name: str, skip: set[str]) -> bool:
    return any(name == s or name.endswith(f".{s}") or f".{s}." in f".{name}." for s in skip)


def _quantized(module: nn.Module, quant_config, device: torch.device) -> nn.Module:
    if isinstance(quant_config, TorchQuantConfig):
        return quant_config.layer.empty_like(module, quant_config.fmt, device).quantize_from(module)
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
