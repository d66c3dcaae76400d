"""8-bit linear layers for a frozen backbone: int8 or FP8 (e4m3) weights with one float32 scale
per output row.

Weight-only (`weight_only_linear`): activations stay in the compute dtype (bf16/fp32). The
product is `y = (x @ Q^T) diag(s) + b`: the 8-bit values are converted to the compute dtype
(exactly) and multiplied with the device's dense GEMM, the scales applied to the small side. On
a 2-core EPYC at the 7B shapes it takes 1.04-1.15x the bf16 GEMM's time, where ATen's
`_weight_int8pack_mm` took 2.7x, `_scaled_mm` with FP8 4.5x and bitsandbytes' LLM.int8
1.15-1.7x (`benchmarks/results/quant_gemm_cpu.md`). On CPU the forward converts the weight in
blocks of output rows that stay in cache, or whole, whichever this CPU runs faster
(`cpu_block_elements`, measured once per machine); FP8 on a CUDA device with rowwise
`_scaled_mm` (sm_90 and newer) runs as an FP8 GEMM instead, the activation quantized per row on
the fly.

Dynamic int8 (`int8_dynamic_linear`): the activations too are quantized per row to int8 on the
fly and the product is an int8 GEMM with exact int32 sums (`torch._int_mm`: oneDNN's AMX-INT8 /
VNNI kernels on CPU, cuBLASLt IMMA on CUDA), with no dequantized copy of the weight: torchao's
int8 dynamic scheme (per-row activation scales, per-output-row weight scales), and optionally
LLM.int8's outlier decomposition (`threshold`). The CPU backward quantizes the output gradient
per row the same way. A CPU whose int8 GEMM saturates (`cpu_int_mm_exact`) gets the weight-only
product. On a 2-core AMX Xeon at the 7B shapes forward and input gradient take
about bf16's time (`benchmarks/results/xeon-amx/quant_gemm_cpu.md`).

The weights are frozen: backward computes the input's gradient (and the bias's, when it
requires one), never a weight gradient.
"""

from __future__ import annotations

import functools
import time

import torch

from deepmlf_fast.fileio import KeyedRecords
from deepmlf_fast.host import cpu_key, freed_memory_kept
from deepmlf_fast.ops.selfcheck import code_digest

FORMATS: dict[str, tuple[torch.dtype, float]] = {
    "int8": (torch.int8, 127.0),
    "fp8": (torch.float8_e4m3fn, 448.0),
}
"""Weight format -> (storage dtype, largest magnitude the format holds)."""

CPU_BLOCKS: tuple[int | None, ...] = (1 << 21, None)
"""What `cpu_block_elements` chooses between: dense elements per converted block of the CPU
forward, a cache-sized block (4 MiB in bf16: 512 rows of a 4096-wide layer; chosen on a 2-core
AVX-512 EPYC) or None, the whole weight converted at once and one GEMM (1.1-1.8x faster forward at
Llama-7B's shapes on a 2-core AMX Xeon with freed memory kept, whose bf16 GEMM runs on AMX tiles:
`benchmarks/results/xeon-amx/quant_gemm_cpu_block_sweep.md`; `benchmarks/bench_quant.py --blocks`
sweeps sizes). Timed with int8 weights, applied to FP8 weights too (the same conversion loop)."""

PROBE_SHAPE = (232, 4096, 4096)
"""(rows, in, out) of the product `cpu_block_elements` times: a MOSEI batch of 4 through one of
Llama-7B's attention projections."""

_BLOCK_RECORDS = KeyedRecords("weight_only_block")
_cpu_blocks: dict[tuple[torch.dtype, bool, int], int | None] = {}  # (dtype, heap kept, threads) -> choice


def quantize_rowwise(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight (N, K)` float -> `(q (N, K) in FORMATS[fmt]'s dtype, scale (N,) float32)` with
    `weight ~= scale[:, None] * q`: each row scaled so its largest magnitude maps to (just
    under) the format's largest value (int8: round to nearest, |q| <= 127; fp8: e4m3, round to
    nearest); every scale is a bf16 value."""
    dtype, qmax = FORMATS[fmt]
    w = weight.detach().to(torch.float32, copy=True)  # the one working copy: the rest is in place
    lo, hi = torch.aminmax(w, dim=1)  # no |w| temporary
    scale = torch.maximum(hi, lo.neg_()).div_(qmax).clamp_min_(torch.finfo(torch.float32).tiny)
    # Rounded up to a bf16 value (the low 16 bits of the float32 cleared, carrying up): the
    # scale is then exact in every compute dtype, so dequantizing rounds once, and a row's
    # largest magnitude still fits the format.
    scale = scale.view(torch.int32).add_(0xFFFF).bitwise_and_(-0x10000).view(torch.float32)
    w.div_(scale[:, None])
    q = w.round_().clamp_(-qmax, qmax).to(dtype) if fmt == "int8" else w.to(dtype)
    return q, scale


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(q (N, K), scale (N,))` -> the dense weight `(N, K)` in `dtype` that the layer stands for
    (8-bit values and scales are exact in bf16: one rounding, of their product)."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device).copy_(q)
    # The scale in out's own dtype (exact: a bf16 value): a mixed-dtype in-place multiply takes
    # ATen's slow path on CPU (45 ms against 1.2 ms for a 4096 x 4096 bf16 weight).
    return out.mul_(scale.to(dtype)[:, None])


def scaled_mm_supported(device: torch.device) -> bool:
    """Whether FP8 products run as `torch._scaled_mm` with rowwise scales on `device`
    (CUDA compute capability 9.0 and newer); elsewhere FP8 weights are dequantized."""
    return device.type == "cuda" and _capability(device.index if device.index is not None
                                                 else torch.cuda.current_device()) >= (9, 0)


@functools.lru_cache(maxsize=None)  # asked by every FP8 linear's forward: one driver query per device
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def int_mm_supported(rows: int, k: int, n: int, device: torch.device) -> bool:
    """Whether `torch._int_mm` multiplies `(rows, k) @ (k, n)` int8 matrices exactly on `device`:
    on CPU any shape, where this process's int8 GEMM does not saturate (`cpu_int_mm_exact`); on
    CUDA more than 16 rows and `k`, `n` multiples of 8 (cuBLASLt's int8 layouts)."""
    if device.type == "cpu":
        return cpu_int_mm_exact()
    return device.type == "cuda" and rows > 16 and k % 8 == 0 and n % 8 == 0


@functools.lru_cache(maxsize=None)  # oneDNN fixes its ISA once per process
def cpu_int_mm_exact() -> bool:
    """Whether the CPU's `torch._int_mm` sums exactly, probed once per process on extreme values
    (16 ms with oneDNN's start on the AMX Xeon). oneDNN's kernels without VNNI or AMX-INT8 (an
    AVX2-only CPU, or `ONEDNN_MAX_CPU_ISA=AVX2`) add pairs of u8 x s8 products in int16 and
    saturate: off by whole units on ordinary activations. There `int8_dynamic_linear` takes the
    weight-only product."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2, (64, 512), generator=gen, dtype=torch.int8).mul_(-2).add_(1).mul_(127)
    b = torch.randint(0, 2, (512, 96), generator=gen, dtype=torch.int8).mul_(-2).add_(1).mul_(127)
    a[0], b[:, 0] = 127, 127  # one all-positive dot product of the largest terms
    return torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())


def weight_only_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                       *, scaled_mm: bool = False) -> torch.Tensor:
    """`x (..., K) @ (diag(scale) q)^T + bias` -> `(..., N)` in the compute dtype (autocast's
    when enabled on x's device, else x's dtype).

    Args:
        x: activations `(..., K)`.
        q: frozen 8-bit weight `(N, K)` (int8 or float8_e4m3fn), from `quantize_rowwise`.
        scale: `(N,)` float32 row scales.
        bias: `(N,)` or None.
        scaled_mm: FP8 only: quantize `x` per row to e4m3 and run `torch._scaled_mm` with
            rowwise scales (`scaled_mm_supported`); else the dequantized product.
    """
    return _EightBitLinear.apply(x, q, scale, bias, scaled_mm, None)


def int8_dynamic_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                        *, threshold: float = 0.0) -> torch.Tensor:
    """`x (..., K) @ (diag(scale) q)^T + bias` -> `(..., N)` in the compute dtype, as an int8 GEMM:
    each row of `x` quantized to int8 with its own scale (largest magnitude -> 127, round to
    nearest), int32 sums (exact while K < 133,153: 127^2 K fits in int32; Llama-7B's widest
    K is 11,008), both scales applied to the float32 result. Backward on CPU quantizes each
    row of `grad (..., N) diag(scale)` the same way and multiplies it with `q`: the input's
    gradient carries the same kind of rounding as the output (on CUDA it is the weight-only one).

    Args:
        x: activations `(..., K)`.
        q: frozen int8 weight `(N, K)` from `quantize_rowwise(w, "int8")`.
        scale: `(N,)` float32 row scales.
        bias: `(N,)` or None.
        threshold: > 0: input columns holding a magnitude of at least it are left out of the int8
            product and multiplied in the compute dtype against their dequantized weight columns
            (LLM.int8's decomposition; bitsandbytes uses 6.0). Found from the rows' maxima, which
            the quantization computes anyway (one host sync on CUDA), but each such column is
            gathered from every row of `q`: cheap for the few systematic outlier features of a
            trained LLM, a second pass over the weight for a random one, whose products exceed 6
            in hundreds of columns. 0 (the default, torchao's int8 dynamic scheme): none.
    Where `torch._int_mm` is not exact on the device or does not take the shape
    (`int_mm_supported`), the weight-only product.
    """
    if not threshold >= 0:
        raise ValueError(f"threshold: expected a magnitude >= 0, found {threshold!r}")
    return _EightBitLinear.apply(x, q, scale, bias, False, float(threshold))


class _EightBitLinear(torch.autograd.Function):
    """Both products; `threshold` None is weight-only, a number the dynamic int8 product."""

    @staticmethod
    def forward(ctx, x, q, scale, bias, scaled_mm, threshold):
        device = x.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        n, k = q.shape
        with torch.autocast(device.type, enabled=False):
            if threshold is not None and int_mm_supported(x2.shape[0], k, n, device):
                y = _int8_matmul(x2, q, scale, dtype, threshold)
            elif scaled_mm and q.dtype == torch.float8_e4m3fn and not (n % 16 or k % 16):
                y = _fp8_matmul(x2, q, scale, dtype)
            else:
                # Off the CPU one dense transient copy is cheap (GPU memory bandwidth): whole.
                elements = cpu_block_elements(dtype) if device.type == "cpu" else None
                y = _dequantized_matmul(x2, q, scale, dtype, rows_per_block(n, k, elements))
            if bias is not None:
                y = y.add_(bias.to(dtype))
        ctx.save_for_backward(q, scale)
        ctx.x_shape, ctx.dtype, ctx.dynamic = x.shape, x.dtype, threshold is not None
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        n, k = q.shape
        g2 = grad.reshape(-1, n)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # CUDA's int8 GEMM is fast only with a column-major second operand, and q as stored is
            # row-major for this product (a transposed copy would double the weight's memory).
            if ctx.dynamic and g2.device.type == "cpu" and cpu_int_mm_exact():
                grad_x = _int8_matmul_t(g2, q, scale, g2.dtype)
            else:
                grad_x = _dequantized_matmul_t(g2, q, scale, g2.dtype)
            grad_x = grad_x.reshape(ctx.x_shape).to(ctx.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = g2.float().sum(0)
        return grad_x, None, None, grad_bias, None, None


def cpu_block_elements(dtype: torch.dtype) -> int | None:
    """The entry of `CPU_BLOCKS` this CPU runs faster for a forward in `dtype`: timed once on
    `PROBE_SHAPE` (a fraction of a second) and kept in `<cache>/weight_only_block/` under the CPU,
    its ISA caps, torch, the thread count, the ops' code and whether this process keeps freed
    memory (`host.keep_freed_memory`, as training runs do: a whole conversion then reuses the
    heap's pages instead of faulting in fresh ones each call), so every run on a machine converts
    alike (the conversion is exact either way; the GEMM's rounding order is the library's).
    bf16 on a CPU that only emulates it is not timed (seconds of emulated products): the first
    entry. Asked by every CPU forward, so after the first call it is one dictionary lookup."""
    state = (dtype, freed_memory_kept(), torch.get_num_threads())
    if state in _cpu_blocks:
        return _cpu_blocks[state]
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        _cpu_blocks[state] = CPU_BLOCKS[0]
        return CPU_BLOCKS[0]
    key = f"{cpu_key()} | {dtype} | heap kept {state[1]} | code {code_digest()}"
    record = _BLOCK_RECORDS.read(key)
    if record is None or "block" not in record or record["block"] not in CPU_BLOCKS:
        times = _time_cpu_blocks(dtype)
        record = {"block": min(times, key=times.get)}
        _BLOCK_RECORDS.write(key, block=record["block"],
                             evidence={str(b): f"{t * 1e3:.2f} ms" for b, t in times.items()})
    _cpu_blocks[state] = record["block"]
    return record["block"]


def _time_cpu_blocks(dtype: torch.dtype, repeats: int = 3) -> dict[int | None, float]:
    """Best-of-`repeats` seconds of `_dequantized_matmul` on `PROBE_SHAPE` for each `CPU_BLOCKS`
    entry, interleaved (a shared machine drifts)."""
    rows, k, n = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scale = torch.full((n,), 1e-2)
    best = {b: float("inf") for b in CPU_BLOCKS}
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for _ in range(repeats):
            for b in CPU_BLOCKS:
                t = time.perf_counter()
                _dequantized_matmul(x, q, scale, dtype, rows_per_block(n, k, b))
                best[b] = min(best[b], time.perf_counter() - t)
    return best


def rows_per_block(n: int, k: int, elements: int | None) -> int:
    """Output rows per converted block of an `(n, k)` weight: `elements` dense elements' worth, or
    all `n` rows (None)."""
    return n if elements is None else max(1, min(n, elements // max(k, 1)))


def _dequantized_matmul(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                        c: int) -> torch.Tensor:
    """`x2 (M, K) @ W^T` -> `(M, N)`: the 8-bit values converted `c` output rows at a time, the
    row scales applied to the `(M, N)` result (the small side) instead of to the weight."""
    n, k = q.shape
    out = torch.empty(x2.shape[0], n, dtype=dtype, device=x2.device)
    buf = torch.empty(c, k, dtype=dtype, device=x2.device)
    for i in range(0, n, c):
        j = min(i + c, n)
        w = buf[: j - i].copy_(q[i:j])  # int8 and e4m3 values are exact in bf16 and fp32
        if c == n:
            torch.mm(x2, w.t(), out=out)
        else:
            out[:, i:j] = x2 @ w.t()
    return out.mul_(scale.to(dtype))


def _dequantized_matmul_t(g2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`g2 (M, N) @ W` = `(g2 diag(scale)) @ q` -> `(M, K)`, q converted whole: a transient dense
    copy of one layer, which measured faster than any blocking on CPU (blocks of columns read
    the weight strided; blocks of rows would accumulate the result in low precision)."""
    w = torch.empty(q.shape, dtype=dtype, device=q.device).copy_(q)
    return (g2 * scale.to(dtype)) @ w


def _fp8_matmul(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x2 (M, K) @ W^T` as an FP8 GEMM: x quantized to e4m3 per row, rowwise scales on both sides."""
    qmax = FORMATS["fp8"][1]
    xf = x2.float()
    xs = xf.abs().amax(dim=1, keepdim=True).div_(qmax).clamp_min_(torch.finfo(torch.float32).tiny)
    x8 = (xf / xs).to(torch.float8_e4m3fn)
    return torch._scaled_mm(x8, q.t(), scale_a=xs, scale_b=scale[None, :].float(), out_dtype=dtype)


def _quantize_rows_(a: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`a (M, K)` float32, overwritten -> `(q (M, K) int8, scale (M, 1) float32, cols (C,) int64)` with
    `a ~= scale * q` outside `cols`: each row's largest magnitude maps to 127, the float32 quotient
    rounded to nearest (|q| <= 127). `cols` are the columns holding a magnitude of at least
    `threshold` (> 0; bitsandbytes' comparison), zeroed in `q` and left out of the scales; found
    from the row maxima, so a matrix without one pays nothing more (one host sync on CUDA)."""
    mag = a.abs()
    amax = mag.amax(dim=1, keepdim=True)
    cols = torch.empty(0, dtype=torch.long, device=a.device)
    if threshold > 0 and bool((amax >= threshold).any()):
        hot = (amax.squeeze(1) >= threshold).nonzero().squeeze(1)
        cols = (mag[hot].amax(dim=0) >= threshold).nonzero().squeeze(1)
        a.index_fill_(1, cols, 0.0)
        amax = mag.index_fill_(1, cols, 0.0).amax(dim=1, keepdim=True)
    scale = amax.div_(127.0).clamp_min_(torch.finfo(torch.float32).tiny)
    return a.div_(scale).round_().to(torch.int8), scale, cols


def _int8_matmul(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                 threshold: float) -> torch.Tensor:
    """`x2 (M, K) @ W^T` -> `(M, N)`: x quantized per row, an int8 GEMM, outlier columns (a
    magnitude of at least `threshold` > 0) multiplied apart in `dtype`."""
    # Row-major whatever x's layout: CUDA's int8 GEMM wants its first operand so.
    xq, xs, cols = _quantize_rows_(x2.to(torch.float32, copy=True, memory_format=torch.contiguous_format), threshold)
    # Scaled in float32 (int32 sums can exceed bf16's 8 significant bits), one rounding to dtype.
    y = torch._int_mm(xq, q.t()).to(torch.float32).mul_(xs).mul_(scale)
    if cols.numel():
        outliers = x2[:, cols] @ dequantize_rowwise(q[:, cols], scale, dtype).t()
        y = y.add_(outliers.to(torch.float32))  # same dtypes: ATen's fast in-place path
    return y.to(dtype)


def _int8_matmul_t(g2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`g2 (M, N) @ W` = `(g2 diag(scale)) @ q` -> `(M, K)`, the scaled gradient quantized per row,
    an int8 GEMM against `q` as stored (no transposed copy)."""
    gq, gs, _ = _quantize_rows_(g2.to(torch.float32, copy=True, memory_format=torch.contiguous_format).mul_(scale))
    return torch._int_mm(gq, q).to(torch.float32).mul_(gs).to(dtype)
