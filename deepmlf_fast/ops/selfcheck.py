"""First contact of the Triton kernels with a device: before a kernel family first runs on a
device (once per process), it runs on a few small shapes against a float64 PyTorch reference,
forward and every gradient, in fp32 and (on CUDA) bf16.

The interpreter that CPU tests use misses compiler bugs, TF32 behaviour and races (Triton
issues #11153, #5895), so a kernel is trusted on a GPU only once it has matched the reference
there. A family that fails (a wrong result, or an error compiling or launching it) is not
used on that device: `dispatch.resolve_backend` falls back to the PyTorch reference for it
with one warning naming the device, the kernel and the error, or raises when the user asked
for `backend='triton'`. Verdicts of CUDA devices are cached on disk per device, driver,
package versions and kernel sources (`cache_dir()/selfcheck/`), so later processes skip the
check; `deepmlf env` shows the last one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import subprocess
from pathlib import Path

import torch

from deepmlf_fast.fileio import KeyedRecords

log = logging.getLogger(__name__)

FAMILIES = ("attention", "gated_linear")
"""Kernel families, each checked and chosen as a whole: `attention` (the varlen
FlashAttention kernels: LM self-attention and MM cross-attention), `gated_linear` (the GEMM
with the dropout + gate + residual epilogue)."""
TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 3e-2}
"""Largest relative error (norm of the difference over the norm of the float64 reference) of
an output or gradient: TF32 products reach ~1e-3, bf16 ones ~1e-2."""

_RECORDS = KeyedRecords("selfcheck")
_verdicts: dict[str, dict[str, str | None]] = {}  # str(device) -> {family: None (passed) or the error}
_warned: set[tuple[str, str]] = set()


def verdict(family: str, device: torch.device) -> str | None:
    """None when `family` passed its self-check on `device` (run now on first contact), else
    the failure in one line. Every op call asks, so after the first a dict lookup answers."""
    if str(device) not in _verdicts:
        found = _cached(device_key(device)) if device.type == "cuda" else None
        if found is None:
            return recheck(device)[family]
        _verdicts[str(device)] = found
    return _verdicts[str(device)][family]


def device_key(device: torch.device) -> str:
    """What a verdict holds for: the device model and capability, the CUDA driver and runtime,
    the versions of torch, triton and deepmlf-fast, and the code that ran (CPU: the interpreter)."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "none"

    versions = (f"torch {torch.__version__} triton {ver('triton')} deepmlf-fast {ver('deepmlf-fast')} "
                f"code {code_digest()}")
    if device.type != "cuda":
        return f"{device.type} interpreter | {versions}"
    major, minor = torch.cuda.get_device_capability(device)
    return (f"{torch.cuda.get_device_name(device)} sm_{major}{minor} | driver {cuda_driver()} cuda {torch.version.cuda} "
            f"| {versions}")


@functools.cache
def code_digest() -> str:
    """Digest of the kernels' and their launchers' sources (`deepmlf_kernels` and
    `deepmlf_fast.ops`, this check among them). An editable install keeps its version while its
    code changes, and a fixed kernel or check must not inherit a verdict stored by the old code."""
    import deepmlf_kernels

    return sources_digest((Path(deepmlf_kernels.__file__).parent, Path(__file__).parent))


def sources_digest(folders) -> str:
    """sha256 prefix (16 hex digits) over the names and bytes of the `*.py` files of `folders`."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(Path(folder).glob("*.py")):
            digest.update(f"{Path(folder).name}/{path.name}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def cuda_driver() -> str:
    """The NVIDIA driver's version (NVML, else `nvidia-smi`), or "unknown": torch does not say."""
    try:
        import pynvml

        pynvml.nvmlInit()
        found = pynvml.nvmlSystemGetDriverVersion()
        return found.decode() if isinstance(found, bytes) else str(found)
    except Exception:  # noqa: BLE001 - NVML missing or not permitted: ask nvidia-smi
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    return out[0] if out else "unknown"


def recheck(device: torch.device) -> dict[str, str | None]:
    """Run every family's check on `device` now, even when a verdict is known (`deepmlf bench`),
    and keep the result for this process (and on disk for a CUDA device)."""
    found = run_checks(device)
    if device.type == "cuda":
        _store(device_key(device), found)
    _verdicts[str(device)] = found
    return found


def run_checks(device: torch.device) -> dict[str, str | None]:
    """Run every family's check on `device`: -> {family: None or the error in one line}.
    `DEEPMLF_TRITON_CONFIG` pins are lifted meanwhile (they are for the caller's shapes).
    The checks run with gradients on and autocast off whatever the caller's mode: first contact
    often comes in evaluation (no_grad, inference mode) or under autocast, where a sound kernel
    would fail its gradient check or be compared in another dtype (and, on CUDA, be remembered
    as broken on disk)."""
    from deepmlf_kernels.common import CONFIG_ENV

    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    pin = os.environ.pop(CONFIG_ENV, None)
    out = {}
    try:
        no_autocast = (torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type)
                       else contextlib.nullcontext())
        with torch.inference_mode(False), torch.enable_grad(), no_autocast:
            for family, check in (("attention", _check_attention), ("gated_linear", _check_gated_linear)):
                try:
                    for dtype in dtypes:
                        check(device, dtype)
                    out[family] = None
                except Exception as e:  # noqa: BLE001 - any failure means "do not use this kernel here"
                    out[family] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    finally:
        if pin is not None:
            os.environ[CONFIG_ENV] = pin
    return out


def gate(backend: str, families: tuple[str, ...], device: torch.device) -> str:
    """The backend for an op using kernel `families` on `device` once Triton was chosen:
    "triton" when every family passed its self-check; else "reference" with one warning per
    failed family, or RuntimeError when `backend` is "triton" (the user asked for the kernels)."""
    for family in families:
        failure = verdict(family, device)
        if failure is None:
            continue
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the Triton interpreter"
        if backend == "triton":
            raise RuntimeError(f"backend='triton': the {family} kernels failed their first-contact self-check on "
                               f"{device} ({name}): {failure}")
        if (str(device), family) not in _warned:
            _warned.add((str(device), family))
            log.warning("the %s kernels failed their first-contact self-check on %s (%s): %s; using the PyTorch "
                        "reference for them (backend='triton' makes this an error)", family, device, name, failure)
        return "reference"
    return "triton"


def last_result() -> dict | None:
    """The most recent stored self-check (`{"device": key, "time": ..., "verdicts": ...}`), or None."""
    return _RECORDS.latest()


def _cached(key: str) -> dict[str, str | None] | None:
    record = _RECORDS.read(key)
    verdicts = record.get("verdicts") if record else None
    return verdicts if isinstance(verdicts, dict) and set(verdicts) == set(FAMILIES) else None


def _store(key: str, verdicts: dict[str, str | None]) -> None:
    _RECORDS.write(key, verdicts=verdicts)


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    err = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
    if not math.isfinite(err) or err > TOLERANCE[dtype]:
        raise AssertionError(f"{name} differs from the float64 reference in {str(dtype).replace('torch.', '')}: "
                             f"relative error {err:.2e} > {TOLERANCE[dtype]:.0e}")


def _check_attention(device: torch.device, dtype: torch.dtype) -> None:
    """Causal GQA attention over two packed samples (5 and 11 rows, head dim 32), and a
    cross-attention-like call (non-causal, head dim 30, `seqused_k`): outputs and dq, dk, dv."""
    from deepmlf_kernels.attention import varlen_attention_triton

    gen = torch.Generator().manual_seed(0)
    for causal, lens_q, lens_k, heads, d, used in ((True, (5, 11), (5, 11), (4, 2), 32, None),
                                                   (False, (3, 4), (7, 12), (2, 2), 30, (5, 12))):
        cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
        seqused = None if used is None else torch.tensor(used, dtype=torch.int32, device=device)
        q = torch.randn(sum(lens_q), heads[0], d, generator=gen)
        k, v = (torch.randn(sum(lens_k), heads[1], d, generator=gen) for _ in range(2))
        grad = torch.randn(sum(lens_q), heads[0], d, generator=gen)
        args = (cu_q, cu_k, max(lens_q), max(lens_k))
        kw = dict(causal=causal, seqused_k=seqused)
        ours = [t.to(device, dtype).detach().requires_grad_() for t in (q, k, v)]
        out = varlen_attention_triton(*ours, *args, **kw)
        out.backward(grad.to(device, dtype))
        ref = [t.to(device, torch.float64).detach().requires_grad_() for t in (q, k, v)]
        want = _attention64(*ref, lens_q, lens_k, causal, used)
        want.backward(grad.to(device, torch.float64))
        _compare("attention output", out, want, dtype)
        for name, a, b in zip(("dq", "dk", "dv"), ours, ref):
            _compare(f"attention {name}", a.grad, b.grad, dtype)


def _attention64(q, k, v, lens_q, lens_k, causal, used):
    """Sample by sample softmax attention in float64: GQA by repeating kv heads, the causal mask
    aligned bottom-right, keys past `used[b]` masked."""
    out, sq, sk = [], 0, 0
    group = q.shape[1] // k.shape[1]
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qb = q[sq:sq + lq].transpose(0, 1)  # (H, lq, d)
        kb, vb = (t[sk:sk + lk].repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
        scores = qb @ kb.transpose(1, 2) / math.sqrt(q.shape[-1])
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if causal:
            keep &= torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + lk - lq
        if used is not None:
            keep &= torch.arange(lk, device=q.device)[None, :] < used[b]
        out.append((scores.masked_fill(~keep, float("-inf")).softmax(-1) @ vb).transpose(0, 1))
        sq, sk = sq + lq, sk + lk
    return torch.cat(out)


def _check_gated_linear(device: torch.device, dtype: torch.dtype) -> None:
    """`x + g * (h @ w^T)` at 37 rows, N 48, K 80, per-channel gate: output and every gradient."""
    from deepmlf_kernels.gated_linear import gated_linear

    gen = torch.Generator().manual_seed(1)
    x, h = torch.randn(37, 48, generator=gen), torch.randn(37, 80, generator=gen)
    w, g = torch.randn(48, 80, generator=gen) / 9, torch.rand(48, generator=gen)
    grad = torch.randn(37, 48, generator=gen)
    ours = [t.to(device, dtype).detach().requires_grad_() for t in (x, h, w)] + [g.to(device).detach().requires_grad_()]
    out = gated_linear(*ours)
    out.backward(grad.to(device, dtype))
    ref = [t.to(device, torch.float64).detach().requires_grad_() for t in (x, h, w, g)]
    want = ref[0] + ref[3] * (ref[1] @ ref[2].t())
    want.backward(grad.to(device, torch.float64))
    _compare("gated_linear output", out, want, dtype)
    for name, a, b in zip(("dx", "dh", "dw", "dgate"), ours, ref):
        _compare(f"gated_linear {name}", a.grad, b.grad, dtype)
