"""pytest wiring of the benchmark suite: options, shape parametrisation, the shared timer, the
end-of-run table and the CSV record switch.

Options (each also readable from an environment variable, for scripts):

    --record / --bench-record   DEEPMLF_BENCH_RECORD=1      append rows to benchmarks/results/<suite>.csv
    --bench-device auto|cpu|cuda  DEEPMLF_BENCH_DEVICE     auto: cuda when available
    --bench-shapes auto|small|full  DEEPMLF_BENCH_SHAPES   microbenchmark shapes; auto: small on CPU, full on CUDA
    --bench-dtype auto|float32|bfloat16  DEEPMLF_BENCH_DTYPE  auto: float32 on CPU, bfloat16 on CUDA
    --bench-step auto|smoke|table  DEEPMLF_BENCH_STEP      step configs; auto: smoke when benchmarks are
                                                           disabled, the device's table otherwise
    --bench-steps N             DEEPMLF_BENCH_STEPS         timed training steps per provider
    --bench-rep-ms MS           DEEPMLF_BENCH_REP_MS        CUDA: time budget of the samples of one case
    --bench-threads N           DEEPMLF_BENCH_THREADS       CPU threads; 0 (default): torch's default when
                                                           timing, 1 in smoke runs (avoids OpenMP stalls
                                                           on shared cores)
    --bench-deadline-s S        DEEPMLF_BENCH_DEADLINE_S    skip cases starting after S seconds (time-boxed runs)
    --bench-results-dir DIR     DEEPMLF_BENCH_RESULTS       where --record writes

The repository's pytest `addopts` include `--benchmark-disable`: every case then runs once (a
smoke test of every provider, fast enough for CI). Real measurements need `--benchmark-enable`;
`--record` refuses to store numbers from a disabled run.

Every test calls the `measure` fixture exactly once; the rows of the whole session are printed at
the end as one table per suite and device, providers side by side with their ratio to the suite's
baselines (`harness.SUITE_BASELINES`), and appended to the CSVs when recording.

Values are checked whatever the mode (disabled or timed): each suite compares a provider's forward
with its reference before timing it, and in the backward modes passes the gradients the timed
callable returns, once, outside the timing, to the `check_gradients` fixture, against the
reference's gradients in the benchmark dtype and in `BenchEnv.exact_dtype`. So a wrong provider
fails instead of posting a fast number. Quick run of those checks alone:
`pytest benchmarks -k "backward or bwd"` (a few seconds on CPU).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import harness
import shapes

_ROWS = pytest.StashKey[list]()
_ENV = pytest.StashKey["BenchEnv"]()
_START = pytest.StashKey[float]()


def _env_default(name: str, default: str) -> str:
    return os.environ.get(name, default) or default


def pytest_addoption(parser):
    g = parser.getgroup("deepmlf-bench", "deepmlf-fast benchmarks")
    g.addoption("--record", "--bench-record", dest="bench_record", action="store_true",
                default=harness.env_flag("DEEPMLF_BENCH_RECORD"),
                help="append results to benchmarks/results/*.csv (needs --benchmark-enable)")
    g.addoption("--bench-device", default=_env_default("DEEPMLF_BENCH_DEVICE", "auto"),
                choices=("auto", "cpu", "cuda"), help="device of the benchmarks (auto: cuda when available)")
    g.addoption("--bench-shapes", default=_env_default("DEEPMLF_BENCH_SHAPES", "auto"),
                choices=("auto", "small", "full"), help="microbenchmark shape list (auto: small on CPU, full on CUDA)")
    g.addoption("--bench-dtype", default=_env_default("DEEPMLF_BENCH_DTYPE", "auto"),
                choices=("auto", "float32", "bfloat16"), help="microbenchmark dtype (auto: fp32 CPU, bf16 CUDA)")
    g.addoption("--bench-step", default=_env_default("DEEPMLF_BENCH_STEP", "auto"),
                choices=("auto", "smoke", "table"), help="step configurations (auto: smoke when disabled)")
    g.addoption("--bench-steps", type=int, default=int(_env_default("DEEPMLF_BENCH_STEPS", "0")),
                help="timed training steps per step provider (0: 2 when disabled, 10 otherwise)")
    g.addoption("--bench-rep-ms", type=float, default=float(_env_default("DEEPMLF_BENCH_REP_MS", "100")),
                help="CUDA: milliseconds of timed replays per case (sample count 25-400)")
    g.addoption("--bench-threads", type=int, default=int(_env_default("DEEPMLF_BENCH_THREADS", "0")),
                help="CPU threads for torch (0: torch's default when timing, 1 when disabled); also used by the "
                     "step subprocesses")
    g.addoption("--bench-deadline-s", type=float, default=float(_env_default("DEEPMLF_BENCH_DEADLINE_S", "0")),
                help="skip benchmarks that would start later than this many seconds after the session "
                     "start (0: no deadline), so a time-boxed run still ends and records what it measured")
    g.addoption("--bench-results-dir", default=_env_default("DEEPMLF_BENCH_RESULTS", str(harness.RESULTS_DIR)),
                help="directory of the result CSVs")


@dataclass(frozen=True)
class BenchEnv:
    """Resolved benchmark settings of the session."""

    device: harness.DeviceInfo
    dtype: torch.dtype
    tier: str
    step_tier: str
    enabled: bool
    """pytest-benchmark enabled: real timing; otherwise one call per case."""
    record: bool
    steps: int
    warmup_steps: int
    threads: int
    """CPU threads of the benchmarks (0: torch's default); set only while a benchmark runs."""
    rep_ms: float
    results_dir: Path

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def exact_dtype(self) -> torch.dtype:
        """The dtype of the exact reference in gradient checks: float64 for a float32 run, float32
        for the 16-bit dtypes (their rounding is what the check measures; float64 would only cost)."""
        return torch.float64 if self.dtype == torch.float32 else torch.float32


def _resolve_env(config) -> BenchEnv:
    device = config.getoption("bench_device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA device is available")
    # pytest-benchmark's own rule (session.py): disabled = --benchmark-disable and not --benchmark-enable.
    enabled = not (config.getoption("benchmark_disable", default=False)
                   and not config.getoption("benchmark_enable", default=False))
    tier = config.getoption("bench_shapes")
    if tier == "auto":
        tier = "full" if device == "cuda" else "small"
    dtype = config.getoption("bench_dtype")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    step_tier = config.getoption("bench_step")
    if step_tier == "auto":
        step_tier = "table" if enabled else "smoke"
    steps = config.getoption("bench_steps") or (10 if enabled else 2)
    record = bool(config.getoption("bench_record"))
    if record and not enabled:
        raise pytest.UsageError(
            "--record/DEEPMLF_BENCH_RECORD needs --benchmark-enable: a disabled run times each case once, "
            "which is a smoke test, not a measurement"
        )
    threads = config.getoption("bench_threads")
    if threads == 0 and not enabled:
        # Smoke runs time nothing that matters; one thread avoids OpenMP spin-wait stalls on shared CI
        # cores, which made single calls 10-100x slower in practice.
        threads = 1
    return BenchEnv(
        device=harness.describe_device(device, threads), dtype=getattr(torch, dtype), tier=tier, step_tier=step_tier,
        enabled=enabled, record=record, steps=steps, warmup_steps=2 if enabled else 1, threads=threads,
        rep_ms=config.getoption("bench_rep_ms"), results_dir=Path(config.getoption("bench_results_dir")),
    )


def pytest_configure(config):
    config.stash[_ROWS] = []
    config.stash[_ENV] = _resolve_env(config)
    config.stash[_START] = time.monotonic()


def pytest_runtest_setup(item):
    deadline = item.config.getoption("bench_deadline_s")
    if deadline and time.monotonic() - item.config.stash[_START] > deadline:
        pytest.skip(f"--bench-deadline-s {deadline:g} reached")


def pytest_generate_tests(metafunc):
    """Shapes come from the registry (`shapes.py`), chosen by tier and device, never from tests."""
    env: BenchEnv = metafunc.config.stash[_ENV]
    if "xattn_shape" in metafunc.fixturenames:
        items = shapes.cross_attention_shapes(env.tier)
        metafunc.parametrize("xattn_shape", items, ids=[s.id for s in items])
    if "sattn_shape" in metafunc.fixturenames:
        items = shapes.self_attention_shapes(env.tier)
        metafunc.parametrize("sattn_shape", items, ids=[s.id for s in items])
    if "mllama_shape" in metafunc.fixturenames:
        items = shapes.mllama_shapes(env.tier)
        metafunc.parametrize("mllama_shape", items, ids=[s.key for s in items])
    if "step_config" in metafunc.fixturenames:
        items = shapes.step_configs(env.step_tier, env.device.kind)
        metafunc.parametrize("step_config", items, ids=[s.name for s in items])


@pytest.fixture(scope="session")
def bench_env(pytestconfig) -> BenchEnv:
    """Device, dtype, tiers and switches of this run."""
    return pytestconfig.stash[_ENV]


@pytest.fixture(autouse=True)
def _bench_threads(bench_env: BenchEnv):
    """Apply --bench-threads to benchmark tests only (the rest of a `pytest` session keeps its own)."""
    if bench_env.threads <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(bench_env.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


GRAD_ERROR_RATIO = 3.0
"""Headroom of a provider's gradient error over the reference's own error in the same dtype."""
GRAD_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}
"""Error always allowed, relative to the tensor's largest exact gradient. A scalar gradient (a gate)
sums every element's contribution with cancellation, so its 16-bit error relative to its value is
a few percent (3 % for the cross-attention gate in bf16 on CPU) whatever the reference's own
error on that one number happened to be; wrong gradients are off by tens of percent."""


def _check_gradients(what: str, names, got, low, exact) -> None:
    names, got, low, exact = list(names), list(got), list(low), list(exact)
    assert len(names) == len(got) == len(low) == len(exact), f"{what}: {len(got)} gradients for {names}"
    for name, g, lo, ex in zip(names, got, low, exact):
        assert g.shape == ex.shape, f"{what}: d{name} has shape {tuple(g.shape)}, expected {tuple(ex.shape)}"
        assert torch.isfinite(g).all(), f"{what}: d{name} has non-finite values"
        ex = ex.double()
        err = (g.double() - ex).abs().max().item()
        base = (lo.double() - ex).abs().max().item()
        bound = GRAD_ERROR_RATIO * base + GRAD_FLOOR[lo.dtype] * ex.abs().max().item()
        assert err <= bound, (f"{what}: d{name} max error {err:.3g} > {bound:.3g} "
                              f"(reference in {lo.dtype}: {base:.3g})")


@pytest.fixture
def check_gradients() -> Callable[..., None]:
    """FlashAttention's error-ratio criterion for every gradient of a benchmarked backward:

        max|got - exact| <= GRAD_ERROR_RATIO * max|low - exact| + GRAD_FLOOR[dtype] * max|exact|

    Call as `check_gradients(what, names, got, low, exact)`: `got` the provider's gradients (those
    the timed callable returns), `low` the reference's in the benchmark dtype, `exact` the
    reference's in `BenchEnv.exact_dtype`, one per name. The bound scales with what the dtype
    achieves on this input, so one rule serves float32 on CPU and bf16 on the GPU.
    AssertionError naming the provider/mode (`what`) and the gradient.
    """
    return _check_gradients


@pytest.fixture
def record_row(pytestconfig):
    """Add a finished `harness.Row` to the session's results (for suites that time themselves)."""
    return pytestconfig.stash[_ROWS].append


@pytest.fixture
def measure(request, bench_env: BenchEnv, record_row) -> Callable[..., harness.Row]:
    """Time one benchmark case and add its row to the session.

    Call as `measure(make_fn, suite=..., provider=..., mode=..., shape=..., flops=..., bytes=...)`,
    where `make_fn()` does the setup (a forward pass for a backward benchmark, compilation, ...)
    and returns the zero-argument callable to time. On CUDA the setup runs on the timing stream.
    """

    def run(make_fn, *, suite: str, provider: str, mode: str, shape: str, flops=None, bytes=None, note: str = ""):
        kind = bench_env.device.kind
        if kind == "cuda":
            if bench_env.enabled:
                timing = harness.cuda_time(make_fn, rep_ms=bench_env.rep_ms)
            else:
                timing = harness.time_single(make_fn(), "cuda")
        else:
            benchmark = request.getfixturevalue("benchmark")
            benchmark.group = f"{suite} | {shape} | {mode}"
            benchmark.extra_info.update(provider=provider, shape=shape, mode=mode)
            fn = make_fn()
            if benchmark.disabled:
                t0 = time.perf_counter()
                benchmark(fn)
                timing = harness.Timing([(time.perf_counter() - t0) * 1e6], "single")
            else:
                benchmark(fn)
                data = benchmark.stats.stats.data  # seconds per call, one entry per round
                timing = harness.Timing([d * 1e6 for d in data], "pytest-benchmark")
        row = harness.make_row(
            timing, suite=suite, provider=provider, mode=mode, shape=shape, dtype=bench_env.dtype_name,
            device=bench_env.device.name, bytes=bytes, flops=flops, peak=bench_env.device.peak, note=note,
        )
        record_row(row)
        return row

    return run


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    env: BenchEnv = config.stash[_ENV]
    harness.fill_ratios(rows)
    tr = terminalreporter
    tr.section("deepmlf-fast benchmarks")
    tr.write_line(
        f"device: {env.device.name} | dtype: {env.dtype_name} | shapes: {env.tier} | steps: {env.step_tier} | "
        f"{'timed' if env.enabled else 'benchmark disabled (one call per case)'}"
    )
    tr.write_line("ratios: median(baseline) / median(provider), > 1 = faster than the baseline")
    for line in harness.summary_lines(rows, indicative=not env.enabled):
        tr.write_line(line)
    if env.record:
        for path in harness.append_csv(rows, env.results_dir):
            tr.write_line(f"recorded -> {path}")
