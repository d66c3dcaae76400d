"""Gated residual linear in Triton: `out = x + g * dropout(h @ W^T)`.

The epilogue of a Flamingo-style gated block (the attention output projection, the gate
and the residual) as one GEMM launch. The kernels take the gate's value g, not its
parameter: the gate nonlinearity (sigmoid, tanh) lives in `deepmlf_fast.ops.gate` and is
differentiated by autograd there, so this file knows no gate.

Supports
* h `(M, K)`, W `(N, K)` (`nn.Linear` layout), x `(M, N)`, any strides; leading dims of
  the public `gated_linear` are flattened;
* g a scalar `(1,)`/`()` or per channel `(N,)`, any float dtype (read as fp32);
* dropout on `h @ W^T` from in-kernel Philox: element (m, n) keeps iff
  `tl.rand(seed, m*N + n) > p`, seed read from a 1-element int64 tensor;
  `gated_linear_dropout_mask` materialises the same bits;
* fp32 / bf16 / fp16, fp32 accumulation on tensor cores; fp32 operands in the precision
  PyTorch's cuBLAS setting selects at each launch, as the backward's torch matmuls do:
  TF32 when `torch.backends.cuda.matmul.fp32_precision == "tf32"` (or `allow_tf32`),
  otherwise 3xTF32, which is fp32-accurate (`deepmlf_kernels.common.dot_precision`);
* deterministic backward.

Tiles: `GEMM_TABLE` lists the (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) configs
the forward autotunes over per dot class, each checked by `python -m deepmlf_kernels.aot`
to compile for sm_90 without spills and within shared memory; `DEEPMLF_TRITON_CONFIG`
pins or narrows them at launch time (`deepmlf_kernels.common`). Autotuning launches a
config several times on the same arguments, which is safe here: no kernel reads a buffer
it writes (`out` and `y` are fresh tensors, never x), and nothing accumulates in memory.
Under `TRITON_INTERPRET=1` the product and the bf16 stores go through
`deepmlf_kernels.common`'s `_dot` / `_round`, which reproduce the GPU's arithmetic.

Forward: one launch writes `out` and `y = dropout(h @ W^T)` (pre-gate). `y` is saved
rather than recomputed because dg needs it: storing it costs one extra M x N write in
the same launch, recomputing it would cost a second GEMM and launch; M = B*F fusion rows
is small in DeepMLF. `out - x` cannot stand in for it since g = tanh(0) = 0 at init.

Backward: one element-wise kernel writes `dZ = dY * g * keep / (1-p)` and per-program
partial sums of `dY * y` (a `(programs_m, N)` buffer per channel or one value per program
for a scalar g), reduced by `torch.sum` in a fixed order; then `dh = dZ W` and
`dW = dZ^T h` are plain torch matmuls (cuBLAS beats a hand-written GEMM there), and
`dx = dY`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from deepmlf_kernels.common import (
    INTERPRET, MAX_REGISTERS, TunedKernel, _dot, _round, capability, dot_class, dot_precision, excluded,
    max_shared_memory,
)

# Tiles per dot class: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). M = B*F fusion
# rows is small, so tiles stay at 64 rows or fewer. 64x128 and 128x64 tiles spill on
# sm_90 (or come within a few registers of it): in bf16 when K or N is not a multiple of
# 16 (the absorbed cross-attention's K = H*30), in fp32 (twice the bytes, and 3xTF32
# splits each operand in two) always; fp32 also takes BLOCK_K = 32.
# `python -m deepmlf_kernels.aot` checks every entry.
_FP32_TILES = ((32, 64, 32, 4, 3), (64, 64, 32, 8, 3))
GEMM_TABLE = {
    "16bit": ((32, 64, 64, 8, 3), (64, 64, 64, 8, 3)),
    "tf32": _FP32_TILES,
    "tf32x3": _FP32_TILES,
}


def gemm_configs(cls: str) -> list[triton.Config]:
    """The configs the forward GEMM may run with for dot class `cls` ("16bit", "tf32", "tf32x3")."""
    return [_config(*tile) for tile in GEMM_TABLE[cls]]


def _config(block_m, block_n, block_k, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=num_warps,
                         num_stages=num_stages, maxnreg=MAX_REGISTERS)


@triton.jit
def _load_gate(G, offs_n, mask_n, PER_CHANNEL: tl.constexpr):
    if PER_CHANNEL:
        g = tl.load(G + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    else:
        g = tl.load(G).to(tl.float32)
    return g


@triton.jit
def _keep(seed, offs_m, offs_n, n_cols, dropout_p):
    return tl.rand(seed, offs_m.to(tl.int64)[:, None] * n_cols + offs_n[None, :]) > dropout_p


@triton.jit
def _gated_linear_fwd_kernel(
    X, H, W, G, OUT, Y, SEED,
    M, N, K,
    stride_xm, stride_xn, stride_hm, stride_hk, stride_wn, stride_wk, stride_om,
    dropout_p,
    PER_CHANNEL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT and Y of one (BLOCK_M, BLOCK_N) tile, accumulated in registers over K. Writes
    only OUT and Y, reads neither (the launcher allocates them), so repeated launches
    (autotuning) give the same result."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    h_ptrs = H + offs_m.to(tl.int64)[:, None] * stride_hm + offs_k[None, :] * stride_hk  # (BLOCK_M, BLOCK_K)
    w_ptrs = W + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N) = W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        h = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += _dot(h, w, DOT_PRECISION, UPCAST)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk

    y = acc
    if DROPOUT:
        keep = _keep(tl.load(SEED), offs_m, offs_n, N, dropout_p)
        y = tl.where(keep, acc * (1.0 / (1.0 - dropout_p)), 0.0)
    g = _load_gate(G, offs_n, mask_n, PER_CHANNEL)
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    x = tl.load(X + rows * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    out_off = rows * stride_om + offs_n[None, :]
    tl.store(OUT + out_off, _round(x + g * y, OUT.dtype.element_ty, UPCAST), mask=mask)
    tl.store(Y + out_off, _round(y, Y.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _gated_linear_bwd_kernel(
    DOUT, Y, G, SEED, DZ, PARTIAL,
    M, N,
    stride_dom, stride_don, stride_ym,
    dropout_p,
    PER_CHANNEL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """DZ of one tile and its partial sum of dY * y into PARTIAL (stored, not added:
    repeated launches give the same result; the launcher reduces PARTIAL)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    dout = tl.load(DOUT + rows * stride_dom + offs_n[None, :] * stride_don, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + rows * stride_ym + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    g = _load_gate(G, offs_n, mask_n, PER_CHANNEL)
    dz = dout * g
    if DROPOUT:
        keep = _keep(tl.load(SEED), offs_m, offs_n, N, dropout_p)
        dz = tl.where(keep, dz * (1.0 / (1.0 - dropout_p)), 0.0)
    tl.store(DZ + rows * N + offs_n[None, :], _round(dz, DZ.dtype.element_ty, UPCAST), mask=mask)
    dgate = dout * y  # d out / d gate, summed below
    if PER_CHANNEL:
        tl.store(PARTIAL + pid_m * N + offs_n, tl.sum(dgate, 0), mask=mask_n)
    else:
        tl.store(PARTIAL + pid_m * tl.num_programs(1) + pid_n, tl.sum(dgate))


@triton.jit
def _gated_linear_mask_kernel(SEED, MASK, M, N, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(tl.load(SEED), offs_m, offs_n, N, dropout_p)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(MASK + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], keep.to(tl.int8), mask=mask)


def _space(args):
    device = args["H"].device
    return list(_viable(dot_class(args["DOT_PRECISION"]), max_shared_memory(device), capability(device)))


@functools.lru_cache(maxsize=None)  # per launch otherwise: the same Config objects every time
def _viable(cls: str, limit: int, arch: int) -> tuple[triton.Config, ...]:
    """The table's configs for dot class `cls` whose shared memory fits in `limit` bytes and
    that the AOT check did not exclude on compute capability `arch`."""
    return tuple(c for c in gemm_configs(cls) if shared_memory_estimate(c, cls) <= limit
                 and not excluded("gated_linear_fwd", cls, 0, c, arch))


def shared_memory_estimate(config: triton.Config, cls: str) -> int:
    """Upper estimate of the forward GEMM's shared memory (bytes) with `config` for dot
    class `cls`: one h and one W tile per pipeline stage, plus an fp32 output tile for the
    epilogue's layout change (the AOT check verifies it bounds what Triton allocates for
    sm_90)."""
    kw = config.kwargs
    return (config.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * (2 if cls == "16bit" else 4)
            + kw["BLOCK_M"] * kw["BLOCK_N"] * 4)


_fwd_kernel = TunedKernel(
    "gated_linear_fwd", _gated_linear_fwd_kernel,
    [_config(*tile) for tile in dict.fromkeys(t for tiles in GEMM_TABLE.values() for t in tiles)],
    ["N", "K", "DROPOUT", "DOT_PRECISION"], _space,
)
BWD_BLOCK_M, BWD_BLOCK_N = 64, 64


def gated_linear_forward(x, h, w, g, seed, dropout_p):
    """Launch the forward GEMM. x `(M, N)`, h `(M, K)`, w `(N, K)`.
    Returns `out (M, N)` in x's dtype and `y = dropout(h @ W^T) (M, N)` in h's dtype."""
    m, n = x.shape
    k = h.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    y = torch.empty((m, n), dtype=h.dtype, device=x.device)
    if m == 0 or n == 0:
        return out, y
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _fwd_kernel[grid](
        x, h, w, g, out, y, g if seed is None else seed,  # SEED is only read with dropout
        m, n, k, *x.stride(), *h.stride(), *w.stride(), out.stride(0), dropout_p,
        PER_CHANNEL=g.numel() > 1, DROPOUT=dropout_p > 0.0, DOT_PRECISION=dot_precision(h.dtype), UPCAST=INTERPRET,
    )
    return out, y


def gated_linear_backward(dout, y, g, seed, dropout_p):
    """Launch the backward kernel. Returns `dz (M, N)` (gradient of `h @ W^T`, y's dtype)
    and `dg` shaped like g."""
    m, n = y.shape
    per_channel = g.numel() > 1
    grid = (triton.cdiv(m, BWD_BLOCK_M), triton.cdiv(n, BWD_BLOCK_N))
    dz = torch.empty((m, n), dtype=y.dtype, device=y.device)
    partial = torch.empty((grid[0], n) if per_channel else (grid[0] * grid[1],), dtype=torch.float32,
                          device=y.device)
    if m > 0 and n > 0:
        _gated_linear_bwd_kernel[grid](
            dout, y, g, g if seed is None else seed, dz, partial,
            m, n, *dout.stride(), y.stride(0), dropout_p,
            PER_CHANNEL=per_channel, DROPOUT=dropout_p > 0.0, UPCAST=INTERPRET, BLOCK_M=BWD_BLOCK_M,
            BLOCK_N=BWD_BLOCK_N,
        )
    return dz, partial.sum(0).reshape(g.shape).to(g.dtype)  # (N,) or one value


def gated_linear_dropout_mask(seed: torch.Tensor, m: int, n: int, dropout_p: float) -> torch.Tensor:
    """The `(M, N)` bool keep-mask the gated-linear kernels draw for `seed`."""
    mask = torch.empty((m, n), dtype=torch.int8, device=seed.device)
    if mask.numel() > 0:
        grid = (triton.cdiv(m, BWD_BLOCK_M), triton.cdiv(n, BWD_BLOCK_N))
        _gated_linear_mask_kernel[grid](seed, mask, m, n, dropout_p, BLOCK_M=BWD_BLOCK_M, BLOCK_N=BWD_BLOCK_N)
    return mask.view(torch.bool)


@torch.library.custom_op("deepmlf::gated_linear_fwd", mutates_args=())
def _gated_linear_fwd_op(
    x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, g: torch.Tensor, seed: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_linear_forward(x, h, w, g, seed, dropout_p)


@_gated_linear_fwd_op.register_fake
def _(x, h, w, g, seed, dropout_p):
    return x.new_empty(x.shape), h.new_empty(x.shape)


@torch.library.custom_op("deepmlf::gated_linear_bwd", mutates_args=())
def _gated_linear_bwd_op(
    dout: torch.Tensor, y: torch.Tensor, g: torch.Tensor, seed: torch.Tensor | None, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_linear_backward(dout, y, g, seed, dropout_p)


@_gated_linear_bwd_op.register_fake
def _(dout, y, g, seed, dropout_p):
    return y.new_empty(y.shape), g.new_empty(g.shape)


def _fwd_setup_context(ctx, inputs, output):
    x, h, w, g, seed, ctx.dropout_p = inputs
    ctx.save_for_backward(h, w, g, seed, output[1])


def _fwd_backward(ctx, dout, _dy):
    h, w, g, seed, y = ctx.saved_tensors
    dz, dg = _gated_linear_bwd_op(dout, y, g, seed, ctx.dropout_p)
    dh = dz @ w if ctx.needs_input_grad[1] else None  # (M, K)
    dw = dz.t() @ h if ctx.needs_input_grad[2] else None  # (N, K)
    return dout, dh, dw, dg, None, None


_gated_linear_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def gated_linear(
    x: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x + g * dropout(h @ w^T)` in one Triton launch, differentiable in all inputs.

    Args:
        x: `(..., N)` residual; h: `(..., K)` with the same leading dims; w: `(N, K)`.
        g: `(1,)`, `()` or `(N,)` gate value (e.g. `sigmoid(alpha)`, computed by the caller).
        dropout_p: dropout on `h @ w^T` (pass 0.0 at evaluation).
        seed: optional `(1,)` int64 tensor fixing the dropout bits (replay them with
            `gated_linear_dropout_mask(seed, M, N, dropout_p)`, M = prod of leading dims).

    Returns:
        `(..., N)` in x's dtype. h and w must share a dtype (the one the product is computed
        in); x may differ (an fp32 residual stream under bf16 autocast keeps its precision).
    """
    n, k = w.shape
    if x.shape[-1] != n or h.shape[-1] != k or x.shape[:-1] != h.shape[:-1]:
        raise ValueError(f"gated_linear: shapes x {tuple(x.shape)}, h {tuple(h.shape)}, w {tuple(w.shape)} "
                         "do not fit x (..., N), h (..., K), w (N, K)")
    if h.dtype != w.dtype:
        raise TypeError(f"gated_linear: h and w must share a dtype, found {h.dtype} and {w.dtype}")
    if g.numel() not in (1, n):
        raise ValueError(f"gated_linear: g must have 1 or {n} elements, found {tuple(g.shape)}")
    dropout_p = float(dropout_p)
    if dropout_p > 0.0:
        if seed is None:
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    else:
        seed = None
    out, _ = _gated_linear_fwd_op(x.reshape(-1, n), h.reshape(-1, k), w, g.reshape(-1), seed, dropout_p)
    return out.view(x.shape)
