"""`WeightOnlyLinear` (the `int8-weight-only` and `fp8` methods of `backbones.quantize`) and
`Int8DynamicLinear` (`int8-dynamic`): thin `nn.Module` wrappers of `ops.weight_only`."""

from __future__ import annotations

import torch
import torch.nn as nn

from deepmlf_fast.ops.weight_only import FORMATS, dequantize_rowwise, int8_dynamic_linear, \
    quantize_rowwise, scaled_mm_supported, weight_only_linear


class WeightOnlyLinear(nn.Module):
    """A frozen `nn.Linear` with 8-bit weights: `weight (out, in)` int8 or FP8 e4m3 (stored as
    its bytes, so `module.to(dtype)` cannot convert it), `weight_scale (out,)` float32 row
    scales, `bias (out,)` or None; all buffers. Computes `ops.weight_only.weight_only_linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "int8",
                 device: torch.device | str | None = None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"fmt: expected one of {sorted(FORMATS)}, found {fmt!r}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        storage = torch.int8 if fmt == "int8" else torch.uint8
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=storage, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str = "int8") -> "WeightOnlyLinear":
        """Quantize an `nn.Linear` (or GPT-2's `Conv1D`, whose weight is `(in, out)`) row-wise,
        on the linear's device; the bias is kept in the linear's dtype."""
        return cls.empty_like(linear, fmt, linear.weight.device).quantize_from(linear)

    @classmethod
    def empty_like(cls, linear: nn.Module, fmt: str, device: torch.device | str) -> "WeightOnlyLinear":
        """An unfilled layer for `linear` (which may be on the meta device), allocated on `device`."""
        out_features, in_features = linear.weight.shape
        if type(linear).__name__ == "Conv1D":
            out_features, in_features = in_features, out_features
        layer = cls(in_features, out_features, bias=linear.bias is not None, fmt=fmt, device=device)
        if linear.bias is not None:
            layer.bias = layer.bias.to(linear.bias.dtype)
        return layer

    @torch.no_grad()
    def quantize_from(self, linear: nn.Module) -> "WeightOnlyLinear":
        """Fill this layer, in place, with `linear`'s weights quantized row-wise; -> self."""
        weight = linear.weight.detach()
        if type(linear).__name__ == "Conv1D":
            weight = weight.t()
        q, scale = quantize_rowwise(weight, self.fmt)
        self.weight.copy_(q.view(self.weight.dtype))
        self.weight_scale.copy_(scale)
        if linear.bias is not None:
            self.bias.copy_(linear.bias)
        return self

    @property
    def qweight(self) -> torch.Tensor:
        """The weight in its 8-bit dtype `(out, in)`."""
        return self.weight.view(FORMATS[self.fmt][0])

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight `(out, in)` the layer multiplies with."""
        return dequantize_rowwise(self.qweight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fp8_gemm = self.fmt == "fp8" and scaled_mm_supported(x.device)
        return weight_only_linear(x, self.qweight, self.weight_scale, self.bias, scaled_mm=fp8_gemm)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"fmt={self.fmt}"


class Int8DynamicLinear(WeightOnlyLinear):
    """A `WeightOnlyLinear` of int8 weights (the same buffers and state dict) whose product quantizes
    the activations per row too and runs an int8 GEMM: `ops.weight_only.int8_dynamic_linear`; with
    `threshold` > 0, input columns beyond it in the compute dtype (LLM.int8's outlier
    decomposition; 6.0 is bitsandbytes' value)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "int8",
                 device: torch.device | str | None = None, threshold: float = 0.0):
        if fmt != "int8":
            raise ValueError(f"fmt: Int8DynamicLinear multiplies int8 weights, expected 'int8', found {fmt!r}")
        if not threshold >= 0:
            raise ValueError(f"threshold: expected a magnitude >= 0, found {threshold!r}")
        super().__init__(in_features, out_features, bias=bias, fmt=fmt, device=device)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_dynamic_linear(x, self.qweight, self.weight_scale, self.bias, threshold=self.threshold)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activations=int8 per row, threshold={self.threshold}"
