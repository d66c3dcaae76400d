"""Kernel microbenchmarks of `deepmlf bench`: each attention site at the recipes' shapes, our
Triton kernels against what a user could run instead, in µs per call and in % of the device's
measured copy bandwidth (at tens of tokens these ops are latency- and memory-bound, so FLOP/s
would flatter nobody).

    site             provider      what runs
    self_attention   deepmlf       varlen_attention(backend="triton"): packed rows, no padding
                     reference     varlen_attention(backend="reference"): what `auto` falls back to
                                   (SDPA off the CPU, `ops.attention.sdpa_core`)
                     sdpa_padded   F.scaled_dot_product_attention on the padded batch with a causal +
                                   key-padding mask (Hugging Face's "sdpa" attention)
                     flex          FlexAttention (compiled) over the packed rows, causal within a sample
                     flash_attn    flash_attn_varlen_func, where the flash-attn package is installed
    cross_attention  deepmlf       gated_cross_attention(backend="triton"): norm, projections,
                                   attention, sigmoid gate, residual
                     reference     gated_cross_attention(backend="reference") (SDPA core off the CPU)

Modes: `forward`, and `fwd+bwd` (the forward, then the gradients of every input and trained
weight: what a training step runs). Before a provider is timed its forward is compared with
the reference's on the same inputs; one that differs is reported WRONG and not timed, so a
wrong kernel never posts a fast number.

Bytes (what the op must move at least, at the case's dtype), for % of bandwidth:
    self_attention   forward: read q, k, v, write out; backward: read q, k, v, out, d_out,
                     write dq, dk, dv (packed rows: padding is waste, not work)
    cross_attention  forward: read x, A and the weights, write out; backward: read x, A, the
                     weights and d_out, write dx, dA and the weights' gradients
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from deepmlf_fast.bench.shapes import CrossAttnShape, SelfAttnShape, dims, run_config
from deepmlf_fast.bench.timing import Timing, cuda_time
from deepmlf_fast.ops.attention import varlen_attention
from deepmlf_fast.ops.cross_attention import gated_cross_attention
from deepmlf_fast.ops.dispatch import triton_available, triton_interpreted

SITES = ("self_attention", "cross_attention")
PROVIDERS = {
    "self_attention": ("deepmlf", "reference", "sdpa_padded", "flex", "flash_attn"),
    "cross_attention": ("deepmlf", "reference"),
}
"""Providers of each site, the reference (the fallback `auto` would take) second."""
MODES = ("forward", "fwd+bwd")
RECIPE_BACKBONES = ("smollm2-135m", "gpt2", "gpt2-large", "smollm2-1.7b", "llama-7b")
"""One shape per backbone the recipes train (the demo's SmolLM2-135M, the released GPT-2 base
and large and SmolLM2-1.7B recipes) and the 7B headline, at its recipe's batch, F and L_av."""
TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 4e-2}
"""Largest relative error (norm) of a provider's forward against the reference's."""
REP_MS = 30.0
"""CUDA timing budget per case (graph replays between L2 flushes)."""


@dataclass(frozen=True)
class Case:
    """One site at one shape, in one dtype."""

    site: str
    shape: SelfAttnShape | CrossAttnShape
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@dataclass
class Row:
    """One provider's measurement of a case in one mode (`median_us` None when not timed)."""

    case: Case
    provider: str
    mode: str
    median_us: float | None = None
    p20_us: float | None = None
    p80_us: float | None = None
    bytes: float = 0.0
    timer: str = ""
    note: str = ""
    """Why it was not timed (unavailable here, WRONG, an error), or a remark."""
    ratios: dict[str, float] = field(default_factory=dict)


def recipe_cases() -> list[Case]:
    """Both sites at each `RECIPE_BACKBONES` shape, in the recipe's precision (bf16 for the
    SmolLM2 recipes and the 7B, fp32 for the GPT-2 ones)."""
    cases = []
    for backbone in RECIPE_BACKBONES:
        d, cfg = dims(backbone), run_config(backbone)
        batch = min(cfg.optim.batch_size, 32)
        dtype = torch.bfloat16 if cfg.train.recipe_precision == "bf16" else torch.float32
        cases.append(Case("self_attention", SelfAttnShape(d, batch=batch, n_fusion=d.n_fusion), dtype))
        cases.append(Case("cross_attention", CrossAttnShape(d, batch=batch, n_fusion=d.n_fusion, av_len=d.av_len),
                          dtype))
    return cases


def unavailable(provider: str, case: Case, device: torch.device) -> str | None:
    """Why `provider` cannot run `case` on `device`, or None when it can."""
    if provider == "deepmlf":
        if not triton_available():
            return "triton is not installed"
        if device.type != "cuda" and not triton_interpreted():
            return "needs a CUDA device"
    if provider == "flex" and device.type != "cuda":
        return "compiled FlexAttention is timed on CUDA only"
    if provider == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed"
        if device.type != "cuda" or case.dtype == torch.float32:
            return "flash-attn runs 16-bit inputs on CUDA only"
    return None


def measure(cases: list[Case], device: torch.device, providers: dict[str, tuple[str, ...]] = PROVIDERS,
            log: Callable[[str], None] = print, wall_samples: int = 5) -> list[Row]:
    """Every available provider of every case in both modes: checked, then timed (CUDA graphs
    between L2 flushes on CUDA; elsewhere the median of `wall_samples` wall-clock calls after
    one warm-up). Ratios against the reference are filled in (`> 1`: faster than it)."""
    rows = []
    for case in cases:
        inputs = _make_inputs(case, device)
        want = _forward(case, "reference", inputs)().detach().float()
        for mode in MODES:
            for provider in providers[case.site]:
                row = Row(case, provider, mode, bytes=_bytes(case, mode))
                rows.append(row)
                row.note = unavailable(provider, case, device) or ""
                if row.note:
                    continue
                try:
                    fwd = _forward(case, provider, inputs)
                    err = _relative_error(fwd().detach().float(), want)
                    if err > TOLERANCE[case.dtype]:
                        row.note = f"WRONG: forward differs from the reference by {err:.1e} (relative); not timed"
                        continue
                    timing = _time(_mode_callable(fwd, inputs, mode), device, wall_samples)
                except Exception as exc:  # noqa: BLE001 - a provider that fails is reported, the rest still run
                    row.note = f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
                    continue
                row.median_us, row.timer = timing.median, timing.timer
                row.p20_us, row.p80_us = timing.quantile(0.2), timing.quantile(0.8)
                log(f"  {case.site:15s} {case.shape.id:24s} {case.dtype_name:8s} {mode:7s} {provider:12s} "
                    f"{row.median_us:9.1f} us")
    _fill_ratios(rows)
    return rows


def choose(rows: list[Row]) -> tuple[dict[str, str], dict[str, str]]:
    """-> `({site: 'triton' | 'reference'}, {site: the evidence in one line})`: per site, the
    Triton kernels when their fwd+bwd time summed over the recipes' shapes is at most the
    reference's, and only when they ran (correctly) at every shape the reference ran."""
    choices, evidence = {}, {}
    for site in SITES:
        ref = {r.case: r.median_us for r in rows if r.case.site == site and r.mode == "fwd+bwd"
               and r.provider == "reference" and r.median_us is not None}
        ours = {r.case: r for r in rows if r.case.site == site and r.mode == "fwd+bwd" and r.provider == "deepmlf"}
        if not ref:
            continue
        missing = [f"{c.shape.id} ({ours[c].note if c in ours else 'not run'})" for c in ref
                   if c not in ours or ours[c].median_us is None]
        if missing:
            choices[site] = "reference"
            evidence[site] = f"the Triton kernels were not timed at {'; '.join(missing)}"
            continue
        t_ours, t_ref = sum(ours[c].median_us for c in ref), sum(ref.values())
        choices[site] = "triton" if t_ours <= t_ref else "reference"
        evidence[site] = (f"fwd+bwd over {len(ref)} recipe shapes: Triton {t_ours:.0f} us, reference (SDPA) "
                          f"{t_ref:.0f} us ({t_ref / t_ours:.2f}x)")
    return choices, evidence


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 256 MB device-to-device copy (read + write), the yardstick of the
    bandwidth column."""
    n = 128 * 2**20 if device.type == "cuda" else 16 * 2**20
    src = torch.empty(n, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    timing = _time(lambda: (lambda: dst.copy_(src)), device)
    return 2 * src.numel() * src.element_size() / (timing.quantile(0.2) * 1e-6)


# -- inputs and providers ---------------------------------------------------------------------------
def _make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def leaf(*size, std=1.0, mean=0.0):
        return (torch.randn(*size, generator=g) * std + mean).to(device, case.dtype).requires_grad_()

    d = case.shape.dims
    if case.site == "self_attention":
        lens = case.shape.seq_lens
        n = sum(lens)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        return dict(q=leaf(n, d.n_heads, d.head_dim), k=leaf(n, d.n_kv_heads, d.head_dim),
                    v=leaf(n, d.n_kv_heads, d.head_dim), cu=cu, lens=lens, max_len=max(lens),
                    dout=torch.randn(n, d.n_heads, d.head_dim, generator=g).to(device, case.dtype))
    s, dim, dkv = case.shape, d.d_model, d.av_dim
    return dict(
        x=leaf(s.batch, s.n_fusion, dim), av=leaf(s.batch, s.av_len, dkv),
        norm_weight=leaf(dim, std=0.1, mean=1.0), norm_bias=leaf(dim, std=0.1) if d.norm == "layernorm" else None,
        w_q=leaf(dim, dim, std=dim**-0.5), w_kv=leaf(2 * dim, dkv, std=dkv**-0.5), w_o=leaf(dim, dim, std=dim**-0.5),
        alpha=leaf(1, std=0.5), dout=torch.randn(s.batch, s.n_fusion, dim, generator=g).to(device, case.dtype),
    )


def _forward(case: Case, provider: str, inp: dict) -> Callable[[], torch.Tensor]:
    """A zero-argument forward of `provider` whose output is in the reference's layout; its
    `leaves` attribute lists the tensors the backward differentiates."""
    if case.site == "cross_attention":
        d = case.shape.dims
        names = ("x", "av", "norm_weight", "norm_bias", "w_q", "w_kv", "w_o", "alpha")
        args = [inp[k] for k in names]
        backend = "triton" if provider == "deepmlf" else "reference"

        def fwd():
            return gated_cross_attention(*args, n_heads=d.mm_heads, norm=d.norm, gate="sigmoid", backend=backend)

        fwd.leaves = [t for t in args if t is not None]
        return fwd
    q, k, v, cu, m = inp["q"], inp["k"], inp["v"], inp["cu"], inp["max_len"]
    if provider in ("deepmlf", "reference"):
        backend = "triton" if provider == "deepmlf" else "reference"

        def fwd():
            return varlen_attention(q, k, v, cu, cu, m, m, causal=True, backend=backend)

        fwd.leaves = [q, k, v]
        return fwd
    if provider == "sdpa_padded":
        return _sdpa_padded(case, inp)
    if provider == "flex":
        return _flex(inp)
    if provider == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        def fwd():
            return flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True)

        fwd.leaves = [q, k, v]
        return fwd
    raise ValueError(f"provider: expected one of {PROVIDERS[case.site]}, found {provider!r}")


def _sdpa_padded(case: Case, inp: dict):
    """SDPA on `(B, H, T, d)` tensors padded to the official length T = L + F (built once, as a
    padded model holds them), output gathered back to packed rows for the check only."""
    lens, t_pad = inp["lens"], case.shape.padded_len
    bsz, dev = len(lens), inp["q"].device
    rows = torch.cat([torch.arange(n, device=dev) for n in lens])
    sample = torch.repeat_interleave(torch.arange(bsz, device=dev), torch.tensor(lens, device=dev))

    def padded(t):
        out = t.new_zeros(bsz, t_pad, *t.shape[1:])
        out[sample, rows] = t.detach()
        return out.transpose(1, 2).contiguous().requires_grad_()  # (B, H, T, d)

    q, k, v = (padded(inp[n]) for n in ("q", "k", "v"))
    j = torch.arange(t_pad, device=dev)
    mask = (j[None, :] <= j[:, None])[None] & (j[None, None, :] < torch.tensor(lens, device=dev)[:, None, None])
    mask = mask[:, None]  # (B, 1, T, T)
    gqa = q.shape[1] != k.shape[1]

    def fwd():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2)[sample, rows] if fwd.gather else out

    fwd.gather, fwd.leaves = True, [q, k, v]
    fwd.dout = padded(inp["dout"]).detach()
    return fwd


def _flex(inp: dict):
    """FlexAttention over the packed rows as one sequence, with a block mask that keeps each
    sample causal and apart (the document mask of its documentation)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = (inp[n].detach().transpose(0, 1)[None].contiguous().requires_grad_() for n in ("q", "k", "v"))
    n, dev = q.shape[2], q.device
    doc = torch.repeat_interleave(torch.arange(len(inp["lens"]), device=dev), torch.tensor(inp["lens"], device=dev))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(document_causal, None, None, n, n, device=dev)
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = q.shape[1] != k.shape[1]

    def fwd():
        out = compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        return out[0].transpose(0, 1) if fwd.gather else out

    fwd.gather, fwd.leaves = True, [q, k, v]
    fwd.dout = inp["dout"].transpose(0, 1)[None].contiguous()
    return fwd


def _mode_callable(fwd, inp: dict, mode: str) -> Callable[[], Callable[[], object]]:
    """`make_fn` for the timers: the forward alone, or forward + every gradient, in the
    provider's own layout (no gather or scatter is timed)."""
    if hasattr(fwd, "gather"):
        fwd.gather = False
    dout = getattr(fwd, "dout", inp["dout"])
    if mode == "forward":
        return lambda: fwd
    return lambda: (lambda: torch.autograd.grad(fwd(), fwd.leaves, dout))


def _time(make_fn: Callable[[], Callable[[], object]], device: torch.device, wall_samples: int = 5) -> Timing:
    if device.type == "cuda":
        return cuda_time(make_fn, rep_ms=REP_MS)
    fn = make_fn()
    fn()
    samples = []
    for _ in range(wall_samples):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return Timing(samples, "wall")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else math.inf


def _bytes(case: Case, mode: str) -> float:
    size = torch.empty((), dtype=case.dtype).element_size()
    d = case.shape.dims
    if case.site == "self_attention":
        n = sum(case.shape.seq_lens)
        q, kv = n * d.n_heads * d.head_dim, n * d.n_kv_heads * d.head_dim
        fwd, bwd = 2 * q + 2 * kv, 4 * q + 4 * kv  # q k v out | q out dout dq + k v dk dv
    else:
        s, dim = case.shape, d.d_model
        x, av = s.batch * s.n_fusion * dim, s.batch * s.av_len * d.av_dim
        weights = 2 * dim * dim + 2 * dim * d.av_dim + (2 if d.norm == "layernorm" else 1) * dim + 1
        fwd, bwd = 2 * x + av + weights, 3 * x + 2 * av + 2 * weights  # x av w out | x av w dout dx dav dw
    return float(size * (fwd if mode == "forward" else fwd + bwd))


def _fill_ratios(rows: list[Row]) -> None:
    ref = {(r.case, r.mode): r.median_us for r in rows if r.provider == "reference" and r.median_us is not None}
    for r in rows:
        base = ref.get((r.case, r.mode))
        if base is not None and r.median_us is not None:
            r.ratios["reference"] = base / r.median_us
