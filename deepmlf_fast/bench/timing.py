"""Timing on CUDA and the devices' speed of light: what `deepmlf bench` and the benchmark suite
(`benchmarks/harness.py`) time with.

`cuda_time` captures the callable once into a CUDA graph and replays it; each sample is bracketed
by CUDA events, and a 256 MB buffer is zeroed before every sample. The zeroing evicts the L2 (so
the minimum bytes really come from HBM) and keeps the GPU busy while the host issues the replay,
so host launch overhead is not timed. If a callable cannot be captured (a host synchronisation
inside, for instance) the same loop calls it directly ('events' timer); the flush still hides
launch latency shorter than ~80 us. Wall-clock timers are not used on CUDA: at 1-100 us they
measure Python launch cost, not the kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class DevicePeak:
    """Speed of light of one GPU model (NVIDIA data-sheet values, dense, no sparsity)."""

    label: str
    hbm_bytes_per_s: float
    bf16_flops: float
    """Dense BF16/FP16 tensor-core FLOP/s."""
    fp32_flops: float
    """Non-tensor-core FP32 FLOP/s (our fp32 paths use IEEE fp32 dots, not TF32)."""


# Matched in order against torch.cuda.get_device_name(); the first substring hit wins.
# H100 SXM/PCIe: anchors.md §1.1. H200: 4.8 TB/s HBM3e with the H100's compute (anchors.md §1.1,
# NVIDIA spec, not re-verified here). A100: NVIDIA A100 data sheet. Variants not listed (H100 NVL,
# H200 NVL, ...) get no roofline column rather than a guessed one.
DEVICE_PEAKS: tuple[tuple[str, DevicePeak | None], ...] = (
    ("H200 NVL", None),
    ("H200", DevicePeak("H200 SXM", 4.8e12, 989.4e12, 66.9e12)),
    ("H100 NVL", None),
    ("H100 PCIe", DevicePeak("H100 PCIe", 2.0e12, 756.0e12, 51.2e12)),
    ("H100 80GB HBM3", DevicePeak("H100 SXM", 3.35e12, 989.4e12, 66.9e12)),
    ("H100 SXM", DevicePeak("H100 SXM", 3.35e12, 989.4e12, 66.9e12)),
    ("A100-SXM4-80GB", DevicePeak("A100 SXM 80GB", 2.039e12, 312e12, 19.5e12)),
    ("A100 80GB PCIe", DevicePeak("A100 PCIe 80GB", 1.935e12, 312e12, 19.5e12)),
    ("A100-SXM4-40GB", DevicePeak("A100 SXM 40GB", 1.555e12, 312e12, 19.5e12)),
    ("A100-PCIE-40GB", DevicePeak("A100 PCIe 40GB", 1.555e12, 312e12, 19.5e12)),
)


def device_peak(name: str) -> DevicePeak | None:
    """Peak numbers of a CUDA device name, or None when the model is not in the table."""
    for pattern, peak in DEVICE_PEAKS:
        if pattern in name:
            return peak
    return None


@dataclass
class Timing:
    """Samples of one benchmark, in microseconds."""

    samples_us: list[float]
    timer: str
    """'pytest-benchmark', 'cudagraph', 'events' or 'single'."""
    peak_mem_mb: float | None = None
    note: str = ""

    def quantile(self, q: float) -> float:
        s = sorted(self.samples_us)
        if len(s) == 1:
            return s[0]
        pos = q * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        return self.quantile(0.5)


def cuda_time(
    make_fn: Callable[[], Callable[[], object]],
    *,
    rep_ms: float = 200.0,
    min_samples: int = 25,
    max_samples: int = 400,
    use_graph: bool = True,
) -> Timing:
    """GPU time of the callable returned by `make_fn`, see the module docstring.

    `make_fn` runs on the timing stream (so a forward it runs for a backward benchmark records
    its autograd stream there, which graph capture of the backward requires).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    note = ""
    with torch.cuda.stream(stream):
        fn = make_fn()
        for _ in range(3):  # autotuning, compilation, allocator warm-up
            fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20

        run, timer = fn, "events"
        if use_graph:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=stream):
                    fn()
                torch.cuda.synchronize()
                run, timer = graph.replay, "cudagraph"
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back to events
                torch.cuda.synchronize()
                note = f"graph capture failed ({type(exc).__name__}); timed with events"
                graph = None

        flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
        # Estimate one call to size the sample count.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        start.record()
        for _ in range(5):
            run()
        end.record()
        torch.cuda.synchronize()
        est_ms = max(start.elapsed_time(end) / 5, 1e-3)
        n = int(min(max(rep_ms / (est_ms + 0.1), min_samples), max_samples))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            flush.zero_()
            starts[i].record()
            run()
            ends[i].record()
        torch.cuda.synchronize()
    samples = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return Timing(samples, timer, peak_mb, note)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
