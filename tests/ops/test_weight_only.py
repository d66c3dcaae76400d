"""`ops.weight_only` / `layers.WeightOnlyLinear`, `layers.Int8DynamicLinear`: row-wise int8 and FP8
weights, products and input gradients against an fp64 reference of the same dequantized weight
(weight-only) or of the same int8 rows (dynamic int8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from deepmlf_fast.layers.weight_only import Int8DynamicLinear, WeightOnlyLinear
from deepmlf_fast.ops import weight_only
from deepmlf_fast.ops.weight_only import dequantize_rowwise, int8_dynamic_linear, int_mm_supported, quantize_rowwise, \
    weight_only_linear


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def test_int8_rows_map_their_largest_magnitude_to_127_and_round_to_nearest():
    w = torch.randn(37, 53, dtype=torch.float64) * torch.logspace(-3, 2, 37, dtype=torch.float64)[:, None]
    w[5] = 0.0  # an all-zero row keeps a finite scale
    q, s = quantize_rowwise(w, "int8")
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (37,)
    assert torch.isfinite(s).all() and (q[5] == 0).all()
    nz = torch.arange(37) != 5
    # Each scale is amax / 127 rounded up to a bf16 value: exact in every compute dtype.
    assert torch.equal(s.to(torch.bfloat16).float(), s)
    exact = w[nz].abs().amax(1) / 127
    assert (s[nz].double() >= exact * (1 - 1e-7)).all() and (s[nz].double() <= exact * (1 + 2**-7)).all()
    assert (q[nz].abs().amax(1) >= 126).all()
    ref = (w.float() / s[:, None]).double()  # what the float32 division hands to round()
    assert ((q.double() - ref).abs() <= 0.5 + 1e-6).all()


def test_fp8_rows_use_the_e4m3_range_and_round_trip_within_its_precision():
    w = torch.randn(64, 96, dtype=torch.float64)
    q, s = quantize_rowwise(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    assert (q.float().abs().amax(1) >= 416).all()  # 448 / (1 + 2^-7), rounded to e4m3
    back = dequantize_rowwise(q, s, torch.float64)
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 for normal values.
    big = w.abs() > s[:, None].double() * 2**-6
    assert ((back - w).abs()[big] <= w.abs()[big] * 2**-4 + 1e-12).all()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [None, 300])
def test_product_and_gradients_match_fp64_on_odd_shapes(fmt, dtype, block, monkeypatch):
    """Forward `(M, K) @ W^T + b`, the input's and the bias's gradients, in one block and in many
    (`block` dense elements per block: 300 splits 53 x 67 into blocks of 4-5 rows / columns,
    the last one short), each within 2x the error of torch's dense product of the same
    dequantized weight in the same dtype."""
    monkeypatch.setattr(weight_only, "cpu_block_elements", lambda dtype: block)
    torch.manual_seed(0)
    m, k, n = 29, 67, 53
    q, s = quantize_rowwise(torch.randn(n, k), fmt)
    w64 = dequantize_rowwise(q, s, torch.float64)
    bias = torch.randn(n, dtype=dtype, requires_grad=True)
    x = torch.randn(2, m, k, dtype=dtype, requires_grad=True)
    g = torch.randn(2, m, n, dtype=dtype)
    y = weight_only_linear(x, q, s, bias)
    y.backward(g)
    assert y.dtype == dtype and y.shape == (2, m, n) and x.grad.dtype == dtype

    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    y64 = x64 @ w64.t() + b64
    y64.backward(g.double())
    xd, bd = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    yd = xd @ dequantize_rowwise(q, s, dtype).t() + bd
    yd.backward(g)
    for ours, dense, ref in ((y, yd, y64), (x.grad, xd.grad, x64.grad), (bias.grad, bd.grad, b64.grad)):
        assert _err(ours, ref) <= 2 * _err(dense, ref) + 1e-7, (_err(ours, ref), _err(dense, ref))


def test_autocast_computes_in_its_dtype_and_scaled_mm_fp8_stays_close_to_the_dequantized_product():
    torch.manual_seed(1)
    q, s = quantize_rowwise(torch.randn(48, 64), "fp8")
    x = torch.randn(33, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = weight_only_linear(x, q, s)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ dequantize_rowwise(q, s, torch.float64).t()
    assert _err(y, ref) < 1e-2
    # The FP8 GEMM a CUDA sm_90+ device runs: activations rounded to e4m3 per row too (2^-4
    # relative per element), so the error is that of one more e4m3 rounding, not more.
    y8 = weight_only_linear(x, q, s, scaled_mm=True)
    assert 1e-3 < _err(y8, ref) < 5e-2
    x.requires_grad_()
    weight_only_linear(x, q, s, scaled_mm=True).sum().backward()  # backward: the dequantized weight
    torch.testing.assert_close(x.grad.double(), dequantize_rowwise(q, s, torch.float64).sum(0).expand(33, 64),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_layer_from_linear_and_conv1d_keeps_its_bytes_under_dtype_casts(fmt):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(2)
    lin = nn.Linear(40, 24)
    layer = WeightOnlyLinear.from_linear(lin, fmt)
    assert not list(layer.parameters()) and layer.weight.shape == (24, 40)
    x = torch.randn(5, 40)
    ref = x.double() @ layer.dequantized(torch.float64).t() + lin.bias.double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert _err(layer.dequantized(), lin.weight.detach().double()) < (5e-3 if fmt == "int8" else 5e-2)
    before = layer.weight.clone()
    layer.to(torch.bfloat16)  # the 8-bit bytes are not floating-point storage: untouched
    assert torch.equal(layer.weight, before)

    conv = Conv1D(24, 40)  # (in, out) weight
    conv.weight.data.normal_()
    from_conv = WeightOnlyLinear.from_linear(conv, fmt)
    torch.testing.assert_close(from_conv(x).double(), x.double() @ from_conv.dequantized(torch.float64).t()
                               + conv.bias.double(), rtol=1e-5, atol=1e-5)
    assert _err(from_conv.dequantized().t(), conv.weight.detach().double()) < 5e-2


def test_cpu_block_is_measured_once_per_machine_and_heap_policy(tmp_path, monkeypatch):
    """`cpu_block_elements` takes the faster `CPU_BLOCKS` entry, stores it with its evidence, and a
    later process reads it instead of timing again; a process that keeps freed memory
    (`host.keep_freed_memory`, where a whole conversion reuses the heap) is measured apart."""
    from deepmlf_fast import host

    monkeypatch.setenv("DEEPMLF_CACHE", str(tmp_path))
    monkeypatch.setattr(weight_only, "_cpu_blocks", {})
    timings = []

    def fake_times(dtype):
        timings.append(dtype)
        return {weight_only.CPU_BLOCKS[0]: 2e-3, None: 1e-3}

    monkeypatch.setattr(weight_only, "_time_cpu_blocks", fake_times)
    monkeypatch.setattr(host, "_freed_memory_kept", False)
    assert weight_only.cpu_block_elements(torch.float32) is None and timings == [torch.float32]
    record = next((tmp_path / "weight_only_block").glob("*.json")).read_text()
    assert '"block": null' in record and "1.00 ms" in record and "heap kept False" in record

    monkeypatch.setattr(weight_only, "_cpu_blocks", {})  # a new process: the record, no timing
    assert weight_only.cpu_block_elements(torch.float32) is None and len(timings) == 1

    monkeypatch.setattr(host, "_freed_memory_kept", True)
    weight_only.cpu_block_elements(torch.float32)
    assert len(timings) == 2


def _int8_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dynamic product's activation rounding, written out: per-row scale amax / 127 in float32,
    the float32 quotient rounded to nearest -> (integers as float64, scales as float64)."""
    a32 = a.detach().float()
    sc = a32.abs().max(dim=1, keepdim=True).values / 127
    return torch.round(a32 / sc).double(), sc.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_int8_dynamic_is_the_exact_sum_of_int8_rows_with_outlier_columns_apart(dtype, threshold):
    """Forward: every row of x quantized to int8 (amax -> 127), summed exactly against the int8
    weight, both scales applied; columns holding a magnitude above `threshold` multiplied in fp64
    terms against the dequantized weight instead. Backward: each row of `grad diag(scale)`
    quantized alike, times q. Odd shapes, a 3-D input, a bias; fp64 references throughout."""
    if not weight_only.cpu_int_mm_exact():
        pytest.skip("this process's CPU int8 GEMM saturates (oneDNN without VNNI/AMX): int8-dynamic takes the "
                    "weight-only product here, which the next test checks")
    torch.manual_seed(3)
    m, k, n = 29, 67, 53
    q, s = quantize_rowwise(torch.randn(n, k), "int8")
    w64 = dequantize_rowwise(q, s, torch.float64)
    x = torch.randn(2, m, k).to(dtype)
    x[0, 4, 7], x[1, 9, 30] = 40.0, -30.0  # two outlier columns (7 and 30) of the flattened rows
    x.requires_grad_()
    bias = torch.randn(n, dtype=dtype, requires_grad=True)
    g = torch.randn(2, m, n, dtype=dtype)
    y = int8_dynamic_linear(x, q, s, bias, threshold=threshold) if threshold else int8_dynamic_linear(x, q, s, bias)
    y.backward(g)
    assert y.dtype == dtype and y.shape == (2, m, n) and x.grad.dtype == dtype

    x2 = x.detach().reshape(-1, k).double()
    cols = torch.tensor([7, 30]) if threshold else torch.tensor([], dtype=torch.long)
    inlier = x2.clone()
    inlier[:, cols] = 0
    xq, xs = _int8_rows(inlier)
    y_ref = (xq @ q.double().t()) * xs * s.double() + x2[:, cols] @ w64[:, cols].t() + bias.detach().double()
    gq, gs = _int8_rows(g.reshape(-1, n).float() * s)
    gx_ref = (gq @ q.double()) * gs
    unit = 1e-6 if dtype == torch.float32 else 2**-7  # the result's one rounding to dtype (and bf16's outlier GEMM)
    assert _err(y.reshape(-1, n), y_ref) < unit
    assert _err(x.grad.reshape(-1, k), gx_ref) < unit
    assert _err(bias.grad, g.double().sum((0, 1))) < unit

    # Against the exact product of the dequantized weight: int8 rows cost about 1%; the two
    # outlier rows keep their other features' precision only with the decomposition.
    exact = x2 @ w64.t() + bias.detach().double()
    assert _err(y.reshape(-1, n), exact) < 0.02
    rows = torch.tensor([4, m + 9])
    with torch.no_grad():
        other = int8_dynamic_linear(x, q, s, bias, threshold=6.0 - threshold).reshape(-1, n)
    mixed, plain = (y.reshape(-1, n), other) if threshold else (other, y.reshape(-1, n))
    assert _err(mixed[rows], exact[rows]) * 4 < _err(plain[rows], exact[rows])


def test_int8_dynamic_zero_rows_give_the_bias_and_an_inexact_int8_gemm_the_weight_only_product(monkeypatch):
    torch.manual_seed(5)
    q, s = quantize_rowwise(torch.randn(24, 40), "int8")
    bias = torch.randn(24)
    x = torch.randn(6, 40, dtype=torch.bfloat16)
    x[2] = 0.0
    before = x.clone()
    y = int8_dynamic_linear(x, q, s, bias.bfloat16())
    assert torch.equal(x, before)  # the input is never written
    assert torch.equal(y[2], bias.bfloat16()) and torch.isfinite(y).all()
    # Where torch._int_mm is not exact (a CPU whose int8 kernels saturate; on CUDA, shapes it does
    # not take), the weight-only product, forward and backward.
    monkeypatch.setattr(weight_only, "cpu_int_mm_exact", lambda: False)
    monkeypatch.setattr(weight_only, "cpu_block_elements", lambda dtype: None)
    xg = torch.randn(6, 40, requires_grad=True)
    y = int8_dynamic_linear(xg, q, s)
    y.backward(torch.ones_like(y))
    xw = xg.detach().clone().requires_grad_()
    yw = weight_only_linear(xw, q, s)
    yw.backward(torch.ones_like(yw))
    assert torch.equal(y, yw) and torch.equal(xg.grad, xw.grad)


def test_int8_dynamic_under_autocast_and_its_layer():
    torch.manual_seed(4)
    lin = nn.Linear(64, 48)
    layer = Int8DynamicLinear.from_linear(lin)
    plain = WeightOnlyLinear.from_linear(lin, "int8")
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), plain.state_dict().values()))
    assert layer.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(33, 64)
    torch.testing.assert_close(layer(x), int8_dynamic_linear(x, layer.qweight, layer.weight_scale, layer.bias),
                               rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert _err(y, x.double() @ plain.dequantized(torch.float64).t() + lin.bias.double()) < 2e-2
    with pytest.raises(ValueError, match="fmt: Int8DynamicLinear multiplies int8 weights, expected 'int8', found 'fp8'"):
        Int8DynamicLinear(64, 48, fmt="fp8")
    with pytest.raises(ValueError, match="threshold: expected a magnitude >= 0, found -1.0"):
        int8_dynamic_linear(x, layer.qweight, layer.weight_scale, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold: expected a magnitude >= 0, found nan"):
        Int8DynamicLinear(64, 48, threshold=float("nan"))
    # cuBLASLt's int8 GEMM takes more than 16 rows and widths in multiples of 8; the CPU any shape.
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert int_mm_supported(17, 64, 48, cuda) and not int_mm_supported(16, 64, 48, cuda)
    assert not int_mm_supported(17, 60, 48, cuda) and not int_mm_supported(17, 64, 44, cuda)
    assert int_mm_supported(1, 3, 5, cpu) == weight_only.cpu_int_mm_exact()
    assert not int_mm_supported(32, 64, 64, torch.device("mps"))
