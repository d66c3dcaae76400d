"""Timing, device facts, derived metrics and result rows shared by every benchmark suite.

Timing.
* CPU, benchmark enabled: pytest-benchmark's own calibrated timer (`benchmark(fn)`); median,
  p20 and p80 are taken from its per-round samples.
* CUDA, benchmark enabled: `cuda_time` (CUDA graph replay between L2 flushes, timed with
  events; `deepmlf_fast.bench.timing`, shared with `deepmlf bench`). pytest-benchmark's
  wall-clock timer is not used on CUDA: at 1-100 us it measures Python launch cost, not the
  kernels.
* Benchmark disabled (the repo default, CI): every case runs once and that single call is timed
  ('single' timer). Those numbers are smoke-test output only; `--record` refuses to store them.

Derived metrics (per row, from the median):
* GB/s = bytes / time, TFLOP/s = flops / time, with each suite's byte and FLOP convention stated
  in its module docstring;
* % roofline = 100 * max(bytes / peak bandwidth, flops / peak FLOP/s) / time, the fraction of the
  device's speed-of-light for that op. Only for devices in `DEVICE_PEAKS`; blank otherwise.
* ratio_vs_<baseline> = median(baseline) / median(provider) of the same suite, shape, mode,
  dtype and device in the same run: > 1 means faster than the baseline.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from deepmlf_fast.bench.timing import (  # noqa: F401 - the suites time through the harness
    DevicePeak, Timing, cuda_time, device_peak,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

SUITE_BASELINES: dict[str, tuple[str, ...]] = {
    "cross_attention": ("eager_official", "sdpa"),
    "self_attention": ("eager_masked", "sdpa_dense"),
    "step": ("official",),
    "mllama": ("transformers",),
}
"""Baselines of each suite, in column order; every other provider gets a ratio against each."""

# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    """Where a benchmark runs."""

    kind: str
    """'cpu' or 'cuda'."""
    name: str
    """Human-readable description, recorded in every row (GPU name and power limit, or CPU model,
    ISA path and threads)."""
    peak: DevicePeak | None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.kind)


def describe_device(kind: str, threads: int | None = None) -> DeviceInfo:
    """DeviceInfo of 'cpu' (with PyTorch's ISA path and the thread count benchmarks use) or 'cuda'
    (the current device)."""
    if kind == "cuda":
        name = torch.cuda.get_device_name()
        power = _cuda_power_limit_w()
        label = f"{name} ({power:.0f} W)" if power else name
        return DeviceInfo("cuda", label, device_peak(name))
    # The ISA path PyTorch takes (AVX2, AVX512, AMX...) tells two CPUs of one model name apart.
    isa = torch.backends.cpu.get_cpu_capability()
    return DeviceInfo("cpu", f"{_cpu_model()} / {isa} ({threads or torch.get_num_threads()} threads)", None)


def _cuda_power_limit_w() -> float | None:
    """Enforced power limit in watts (gpt-fast tables state it), or None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
    except Exception:  # noqa: BLE001 - NVML missing or not permitted: leave the limit out
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
def time_single(fn: Callable[[], object], device: str) -> Timing:
    """One call, timed with `perf_counter` (synchronised on CUDA): smoke-run numbers."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return Timing([(time.perf_counter() - t0) * 1e6], "single")


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, device: str, seconds: float) -> float:
    """Mean FLOP/s of back-to-back `(m, k) @ (k, n)` products for about `seconds` (after one
    warm-up product), with the process's current thread count: the machine's own ceiling for a
    step whose work is products of that shape, averaged over the same span of a shared machine's
    drifting speed as the step it is compared with (a median of a few ~10 ms products is not)."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    a @ b
    _sync(device)
    count, t0 = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        _sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2.0 * m * k * n * count / elapsed


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------
@dataclass
class Row:
    """One measured (suite, provider, mode, shape) point."""

    suite: str
    provider: str
    mode: str
    shape: str
    dtype: str
    device: str
    timer: str
    n_samples: int
    median_us: float
    p20_us: float
    p80_us: float
    bytes: float | None = None
    flops: float | None = None
    peak: DevicePeak | None = None
    peak_mem_mb: float | None = None
    note: str = ""
    ratios: dict[str, float | None] = field(default_factory=dict)

    @property
    def gbps(self) -> float | None:
        return None if self.bytes is None else self.bytes / (self.median_us * 1e-6) / 1e9

    @property
    def tflops(self) -> float | None:
        return None if self.flops is None else self.flops / (self.median_us * 1e-6) / 1e12

    @property
    def pct_roofline(self) -> float | None:
        if self.peak is None or (self.bytes is None and self.flops is None):
            return None
        peak_flops = self.peak.bf16_flops if self.dtype in ("bfloat16", "float16") else self.peak.fp32_flops
        t_mem = (self.bytes or 0.0) / self.peak.hbm_bytes_per_s
        t_math = (self.flops or 0.0) / peak_flops
        return 100.0 * max(t_mem, t_math) / (self.median_us * 1e-6)


def make_row(timing: Timing, **fields) -> Row:
    """Row from a Timing plus the identifying fields."""
    return Row(
        timer=timing.timer, n_samples=len(timing.samples_us), median_us=timing.median,
        p20_us=timing.quantile(0.2), p80_us=timing.quantile(0.8),
        peak_mem_mb=fields.pop("peak_mem_mb", timing.peak_mem_mb),
        note="; ".join(x for x in (timing.note, fields.pop("note", "")) if x), **fields,
    )


def fill_ratios(rows: list[Row]) -> None:
    """Set `row.ratios[b] = median(b) / median(row)` for each baseline b of the row's suite,
    comparing only rows of the same suite, shape, mode, dtype and device."""
    index = {(r.suite, r.shape, r.mode, r.dtype, r.device, r.provider): r for r in rows}
    for r in rows:
        for base in SUITE_BASELINES.get(r.suite, ()):
            ref = index.get((r.suite, r.shape, r.mode, r.dtype, r.device, base))
            r.ratios[base] = None if ref is None else ref.median_us / r.median_us


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------
COMMON_COLUMNS = [
    "run_id", "date", "suite", "provider", "mode", "shape", "dtype", "device", "timer", "n_samples",
    "median_us", "p20_us", "p80_us", "gb_per_s", "tflop_per_s", "pct_roofline",
]
TAIL_COLUMNS = ["peak_mem_mb", "torch", "triton", "transformers", "git_commit", "note"]


def csv_columns(suite: str) -> list[str]:
    """Header of a suite's CSV: common columns, one ratio column per baseline, provenance."""
    return COMMON_COLUMNS + [f"ratio_vs_{b}" for b in SUITE_BASELINES[suite]] + TAIL_COLUMNS


def versions() -> dict[str, str]:
    """torch / triton / transformers versions ('' when not installed)."""
    out = {"torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = ""
    return out


def git_commit() -> str:
    """Short HEAD commit, with '+dirty' when the tree has changes ('' outside a git checkout)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True,
            text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{head}+dirty" if head and dirty else head


def row_record(row: Row, run_id: str, date: str, prov: dict[str, str]) -> dict[str, str]:
    """CSV dict of a row (numbers rounded to what the timer can resolve)."""
    rec = {
        "run_id": run_id, "date": date, "suite": row.suite, "provider": row.provider, "mode": row.mode,
        "shape": row.shape, "dtype": row.dtype, "device": row.device, "timer": row.timer,
        "n_samples": str(row.n_samples), "median_us": _fmt(row.median_us, 2), "p20_us": _fmt(row.p20_us, 2),
        "p80_us": _fmt(row.p80_us, 2), "gb_per_s": _fmt(row.gbps, 2), "tflop_per_s": _fmt(row.tflops, 3),
        "pct_roofline": _fmt(row.pct_roofline, 1), "peak_mem_mb": _fmt(row.peak_mem_mb, 1), "note": row.note,
        **prov,
    }
    for base in SUITE_BASELINES[row.suite]:
        rec[f"ratio_vs_{base}"] = _fmt(row.ratios.get(base), 3)
    return rec


def append_csv(rows: list[Row], results_dir: Path = RESULTS_DIR, run_id: str | None = None) -> list[Path]:
    """Append rows to `results_dir/<suite>.csv` (header written on creation); returns the files.

    An existing file with a different header is an error, so columns never silently shift.
    """
    now = _dt.datetime.now(_dt.timezone.utc)
    run_id = run_id or now.strftime("%Y%m%dT%H%M%SZ")
    prov = {**versions(), "git_commit": git_commit()}
    written = []
    for suite in sorted({r.suite for r in rows}):
        path = results_dir / f"{suite}.csv"
        cols = csv_columns(suite)
        results_dir.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != cols:
                raise RuntimeError(f"{path}: header {header} differs from {cols}; move the file aside to start anew")
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            if new:
                w.writeheader()
            for r in rows:
                if r.suite == suite:
                    w.writerow(row_record(r, run_id, now.isoformat(timespec="seconds"), prov))
        written.append(path)
    return written


def _fmt(x: float | None, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


# --------------------------------------------------------------------------------------
# Terminal summary
# --------------------------------------------------------------------------------------
def summary_lines(rows: list[Row], indicative: bool = False) -> list[str]:
    """Plain-text tables of a run, one per suite and device, providers side by side with ratios.
    `indicative` marks a run with benchmarks disabled (one call per case)."""
    lines: list[str] = []
    for suite in sorted({r.suite for r in rows}):
        bases = SUITE_BASELINES.get(suite, ())
        for device in sorted({r.device for r in rows if r.suite == suite}):
            sel = [r for r in rows if r.suite == suite and r.device == device]
            timers = ", ".join(sorted({r.timer for r in sel}))
            unit, scale = ("ms", 1e-3) if suite == "step" else ("us", 1.0)
            lines.append("")
            lines.append(f"== {suite} | {device} | timer: {timers} ==")
            if indicative:
                lines.append("   (benchmark disabled: smoke run, one call per case / few steps; indicative only)")
            head = f"{'shape':<44} {'mode':<10} {'dtype':<8} {'provider':<20} {'median ' + unit:>12} {'p20-p80':>19}"
            head += f" {'GB/s':>8} {'TFLOP/s':>8} {'%roof':>6}" + "".join(f" {'x' + b:>16}" for b in bases)
            head += f" {'peak MB':>9}"
            lines.append(head)
            sel.sort(key=lambda r: (r.shape, r.mode, r.dtype, r.provider not in bases, r.provider))
            for r in sel:
                line = (
                    f"{r.shape[:44]:<44} {r.mode:<10} {r.dtype[:8]:<8} {r.provider[:20]:<20} "
                    f"{r.median_us * scale:>12.1f} {f'{r.p20_us * scale:.1f}-{r.p80_us * scale:.1f}':>19}"
                    f" {_cell(r.gbps, 1):>8} {_cell(r.tflops, 2):>8} {_cell(r.pct_roofline, 1):>6}"
                )
                line += "".join(f" {_cell(r.ratios.get(b), 2):>16}" for b in bases)
                line += f" {_cell(r.peak_mem_mb, 1):>9}"
                lines.append(line)
                if r.note:
                    lines.append(f"{'':<44}   note: {r.note}")
    return lines


def _cell(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    """Rows as plain dicts (for JSON dumps)."""
    return [{**asdict(r), "gbps": r.gbps, "tflops": r.tflops, "pct_roofline": r.pct_roofline} for r in rows]


def env_flag(name: str) -> bool:
    """True when environment variable `name` is set to 1/true/yes."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
