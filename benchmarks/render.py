"""Render the recorded benchmark CSVs as the Markdown tables the README shows.

    python benchmarks/render.py                       # latest run of every suite and device
    python benchmarks/render.py --suite step --device H100 -o bench.md
    python benchmarks/render.py --run all --compact   # every recorded run, provider matrix

gpt-fast honesty rules: every table states the device (with power limit when known), dtype,
timer, library versions, commit and date of the run it comes from, and shows only numbers that
were measured in that run — a missing measurement is a '–', never an estimate. Speed-ups are
median(baseline) / median(provider) within the same run.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import RESULTS_DIR, SUITE_BASELINES  # noqa: E402

TITLES = {
    "cross_attention": "Gated cross-attention (one MM block: F fusion queries x L_av AV steps)",
    "self_attention": "LM self-attention over [text ; fusion] (padded T = L + F vs packed)",
    "step": "Whole DeepMLF training step (official-style vs deepmlf-fast)",
    "mllama": "Llama-3.2-Vision decoder slice (transformers vs apply_deepmlf_kernels_to_mllama)",
}


def load(results_dir: Path, suites: list[str]) -> dict[str, list[dict]]:
    """suite -> CSV rows (dicts), for the suites whose CSV exists."""
    out = {}
    for suite in suites:
        path = results_dir / f"{suite}.csv"
        if path.exists():
            with open(path, newline="") as f:
                out[suite] = list(csv.DictReader(f))
    return out


def select_runs(rows: list[dict], run: str, device: str | None) -> list[list[dict]]:
    """Group rows into runs (run_id, device); keep the latest per device, one given run_id, or all."""
    if device:
        rows = [r for r in rows if device.lower() in r["device"].lower()]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["run_id"], r["device"])].append(r)
    if run == "all":
        keys = sorted(groups)
    elif run == "latest":
        latest: dict[str, str] = {}
        for run_id, dev in groups:
            latest[dev] = max(latest.get(dev, ""), run_id)
        keys = sorted((rid, dev) for dev, rid in latest.items())
    else:
        keys = sorted(k for k in groups if k[0] == run)
    return [groups[k] for k in keys]


def _v(x: str, digits: int = 1, scale: float = 1.0) -> str:
    if x in ("", None):
        return "–"
    return f"{float(x) * scale:.{digits}f}"


def _ratio(x: str) -> str:
    return "–" if x in ("", None) else f"{float(x):.2f}×"


def run_header(rows: list[dict]) -> list[str]:
    r0 = rows[0]
    dtypes = ", ".join(sorted({r["dtype"] for r in rows}))
    timers = ", ".join(sorted({r["timer"] for r in rows}))
    return [
        f"Device: **{r0['device']}** · dtype: {dtypes} · timer: {timers} · torch {r0['torch']} · "
        f"triton {r0['triton'] or '–'} · transformers {r0['transformers'] or '–'} · "
        f"commit `{r0['git_commit'] or '–'}` · run {r0['run_id']} ({r0['date']})",
        "",
    ]


def render_micro(suite: str, rows: list[dict], compact: bool) -> list[str]:
    """Per-row table (default) or provider matrix of one microbenchmark run."""
    bases = SUITE_BASELINES[suite]
    out = [f"### {TITLES[suite]}", ""] + run_header(rows)
    order = {m: i for i, m in enumerate(("forward", "backward", "fwd+bwd"))}
    rows = sorted(rows, key=lambda r: (r["shape"], r["dtype"], order.get(r["mode"], 9), r["provider"] not in bases,
                                       r["provider"]))
    if compact:
        providers = list(bases) + sorted({r["provider"] for r in rows} - set(bases))
        out.append(f"Median µs per provider (speed-up vs `{bases[0]}` in brackets).")
        out.append("")
        out.append("| shape | dtype | mode | " + " | ".join(f"`{p}`" for p in providers) + " |")
        out.append("|---|---|---|" + "---:|" * len(providers))
        cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
        for r in rows:
            cells[(r["shape"], r["dtype"], r["mode"])][r["provider"]] = r
        for (shape, dtype, mode), by_p in cells.items():
            line = f"| {shape} | {dtype} | {mode} |"
            for p in providers:
                r = by_p.get(p)
                line += " – |" if r is None else f" {_v(r['median_us'])} ({_ratio(r[f'ratio_vs_{bases[0]}'])}) |"
            out.append(line)
    else:
        out.append("| shape | dtype | mode | provider | median µs | p20–p80 µs | GB/s | TFLOP/s | % roofline | "
                   + " | ".join(f"vs `{b}`" for b in bases) + " |")
        out.append("|---|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(bases))
        for r in rows:
            out.append(
                f"| {r['shape']} | {r['dtype']} | {r['mode']} | `{r['provider']}` | {_v(r['median_us'])} | "
                f"{_v(r['p20_us'])}–{_v(r['p80_us'])} | {_v(r['gb_per_s'])} | {_v(r['tflop_per_s'], 2)} | "
                f"{_v(r['pct_roofline'])} | " + " | ".join(_ratio(r[f"ratio_vs_{b}"]) for b in bases) + " |"
            )
    notes = sorted({f"`{r['provider']}` {r['shape']} {r['mode']}: {r['note']}" for r in rows if r["note"]})
    if notes:
        out += ["", "Notes:"] + [f"- {n}" for n in notes]
    return out + [""]


def render_step(rows: list[dict]) -> list[str]:
    """Official vs ours per step configuration of one run."""
    out = [f"### {TITLES['step']}", ""] + run_header(rows)
    out.append("| config | dtype | official ms (p20–p80) | ours ms (p20–p80) | speed-up | memory ours/official | "
               "ours, recomputed LM blocks: ms | speed-up | memory ours/official |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    by_shape: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_shape[(r["shape"], r["dtype"])][r["provider"]] = r
    for (shape, dtype), p in sorted(by_shape.items()):
        off = p.get("official")

        def t(r):
            if r is None:
                return "–"
            return f"{_v(r['median_us'], 1, 1e-3)} ({_v(r['p20_us'], 1, 1e-3)}–{_v(r['p80_us'], 1, 1e-3)})"

        def mem(r):
            if not (off and r and off["peak_mem_mb"] and r["peak_mem_mb"] and float(off["peak_mem_mb"]) > 0):
                return "–"
            return f"{float(r['peak_mem_mb']):.0f}/{float(off['peak_mem_mb']):.0f} MB = {float(r['peak_mem_mb']) / float(off['peak_mem_mb']):.2f}"

        cells = [shape, dtype, t(off)]
        for name in ("ours", "ours_recompute"):
            r = p.get(name)
            cells += [t(r) if name == "ours" else (_v(r["median_us"], 1, 1e-3) if r else "–"),
                      _ratio(r["ratio_vs_official"]) if r else "–", mem(r)]
        out.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"{r['shape']} {r['dtype']} `{r['provider']}`: {r['note']}" for r in rows if r["note"]})
    if notes:
        out += ["", "Notes:"] + [f"- {n}" for n in notes]
    return out + [""]


def render(results_dir: Path, suites: list[str], run: str = "latest", device: str | None = None,
           compact: bool = False) -> str:
    """Markdown for the selected suites and runs ('' when nothing is recorded)."""
    lines: list[str] = []
    for suite, rows in load(results_dir, suites).items():
        for group in select_runs(rows, run, device):
            lines += render_step(group) if suite == "step" else render_micro(suite, group, compact)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Render benchmarks/results/*.csv as Markdown tables.")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--suite", action="append", choices=sorted(SUITE_BASELINES),
                    help="suite(s) to render (default: all)")
    ap.add_argument("--device", default=None, help="only runs whose device contains this text")
    ap.add_argument("--run", default="latest", help="'latest' (per device), 'all', or a run_id")
    ap.add_argument("--compact", action="store_true", help="provider matrix instead of one row per provider")
    ap.add_argument("-o", "--out", type=Path, default=None, help="also write the Markdown to this file")
    args = ap.parse_args(argv)
    text = render(args.results_dir, args.suite or list(SUITE_BASELINES), args.run, args.device, args.compact)
    if not text:
        print(f"no recorded results in {args.results_dir} (run pytest benchmarks/ --benchmark-enable --record)",
              file=sys.stderr)
        return 1
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
