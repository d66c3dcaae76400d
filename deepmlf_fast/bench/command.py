"""`deepmlf bench`: everything a user with a GPU runs to report how deepmlf-fast does on it.

    1. the kernels' first-contact self-check (`ops.selfcheck`), run afresh
    2. the kernel microbenchmarks at the recipes' shapes (`bench.kernels`)
    3. a short whole-step comparison, Triton kernels against the reference (`bench.step`)
    4. which backend `auto` should run at each attention site, recorded for this device
       (`ops.autochoice`), unless `--no-record`
    5. bench-<device>-<date>.md and .csv, with the device, driver and versions

On a CPU (or with `--dry-run`) it prints what it would run and exits 0.
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from deepmlf_fast.bench import kernels
from deepmlf_fast.errors import ConfigError
from deepmlf_fast.fileio import atomic_path, check_output, write_text_atomic

STEP_RECIPE = "demo"
"""The whole-step comparison's recipe: the default run's (SmolLM2-135M, bf16), random weights."""
VERSIONED = ("deepmlf-fast", "torch", "triton", "transformers", "flash-attn")


@dataclass(frozen=True)
class BenchOptions:
    """What `deepmlf bench` was asked to do (validated by `check_options`)."""

    device: torch.device
    out: Path
    steps: int = 10
    record: bool = True


def check_options(device: str, out: str, steps: int, record: bool = True) -> BenchOptions:
    """Validate the command's arguments before anything runs; one-line ConfigError otherwise."""
    from deepmlf_fast.hardware import resolve_device

    dev = resolve_device(device, field="--device")
    if not 1 <= steps <= 1000:
        raise ConfigError(f"--steps: expected an integer in [1, 1000], found {steps}")
    return BenchOptions(dev, check_output(out, "--out", ConfigError, directory=True), steps, record)


def plan_lines(opts: BenchOptions) -> list[str]:
    """What `deepmlf bench` runs with these options, one line per item."""
    lines = [f"deepmlf bench on {opts.device}:", "  1. kernel self-check: attention and gated_linear families, fp32 and "
             "bf16, against a float64 reference"]
    lines.append("  2. kernel microbenchmarks (forward and fwd+bwd; us per call, % of measured copy bandwidth):")
    for case in kernels.recipe_cases():
        providers = []
        for p in kernels.PROVIDERS[case.site]:
            why = kernels.unavailable(p, case, torch.device("cuda"))
            providers.append(p if why is None else f"{p} (skipped: {why})")
        lines.append(f"     {case.site:15s} {case.shape.key} {case.dtype_name}: {', '.join(providers)}")
    lines.append(f"  3. whole training step of the `{STEP_RECIPE}` recipe, {opts.steps} timed steps per backend: "
                 "triton vs reference")
    lines.append("  4. " + ("record what `--backend auto` runs at each attention site on this device"
                            if opts.record else "no record of auto's choice (--no-record)"))
    lines.append(f"  5. write {opts.out}/bench-<device>-<date>.md and .csv")
    return lines


def run(opts: BenchOptions, log=print) -> tuple[Path, Path]:
    """Run every item of the plan on `opts.device`; returns the Markdown and CSV files."""
    from deepmlf_fast.bench.step import compare_steps
    from deepmlf_fast.ops import autochoice, selfcheck

    facts = environment(opts.device)
    log("self-check ...")
    verdicts = selfcheck.recheck(opts.device)
    log("copy bandwidth ...")
    bandwidth = kernels.copy_bandwidth(opts.device)
    log("kernels ...")
    rows = kernels.measure(kernels.recipe_cases(), opts.device, log=log)
    choices, evidence = kernels.choose(rows)
    log("whole step ...")
    step_rows, step_note = [], ""
    try:
        cfg = _step_config()
        precision = "bf16" if cfg.train.recipe_precision == "bf16" else "fp32"
        step_rows = compare_steps(cfg, opts.device, ("triton", "reference"), precision, opts.steps)
    except Exception as exc:  # noqa: BLE001 - the kernel tables are still worth writing
        step_note = f"not run: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    recorded = None
    if opts.record and choices:
        recorded = autochoice.record_choices(opts.device, choices, evidence)
    opts.out.mkdir(parents=True, exist_ok=True)
    stem = opts.out / f"bench-{_slug(facts['device'])}-{facts['date'][:10]}"
    md, csv_path = stem.with_suffix(".md"), stem.with_suffix(".csv")
    write_text_atomic(md, markdown(facts, verdicts, bandwidth, rows, choices, evidence, step_rows, step_note, recorded))
    write_csv(csv_path, facts, bandwidth, rows)
    return md, csv_path


def environment(device: torch.device) -> dict[str, str]:
    """Device, driver and versions recorded with the tables."""
    from deepmlf_fast.ops import selfcheck

    facts = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "platform": platform.platform(), "python": platform.python_version()}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        facts.update(device=torch.cuda.get_device_name(device), capability=f"sm_{major}{minor}",
                     driver=selfcheck.cuda_driver(), cuda=str(torch.version.cuda))
    else:
        from deepmlf_fast.hardware import device_facts

        facts.update(device=device_facts(device).name, capability=torch.backends.cpu.get_cpu_capability(),
                     driver="-", cuda="-")
    for name in VERSIONED:
        try:
            facts[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            facts[name] = "not installed"
    return facts


def markdown(facts, verdicts, bandwidth, rows, choices, evidence, step_rows, step_note, recorded) -> str:
    """The report: environment, self-check, kernels per site, auto's choice, whole step."""
    out = [f"# deepmlf bench: {facts['device']}", "",
           f"{facts['date']} | {facts['capability']} | driver {facts['driver']} | CUDA {facts['cuda']} | "
           + " | ".join(f"{n} {facts[n]}" for n in VERSIONED), "",
           f"Measured copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s. Times: medians (p20-p80); "
           f"timer {', '.join(sorted({r.timer for r in rows if r.timer})) or '-'} (cudagraph: graph replays "
           "between L2 flushes).", "", "## Kernel self-check", ""]
    out += [f"- {family}: {'ok' if err is None else 'FAILED: ' + err}" for family, err in verdicts.items()]
    for site in kernels.SITES:
        out += ["", f"## {site}", "", "| shape | dtype | mode | provider | us | p20-p80 | GB/s | % bandwidth "
                "| vs reference | note |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
        for r in (r for r in rows if r.case.site == site):
            timed = r.median_us is not None
            gbps = r.bytes / (r.median_us * 1e-6) / 1e9 if timed else None
            out.append(f"| {r.case.shape.key} | {r.case.dtype_name} | {r.mode} | {r.provider} | "
                       f"{_num(r.median_us, 1)} | {f'{r.p20_us:.1f}-{r.p80_us:.1f}' if timed else '-'} | "
                       f"{_num(gbps, 1)} | {_num(gbps and 100 * gbps * 1e9 / bandwidth, 1)} | "
                       f"{_num(r.ratios.get('reference'), 2)} | {r.note} |")
    out += ["", "## What `--backend auto` runs here", ""]
    out += [f"- {site}: **{choices[site]}** ({evidence[site]})" for site in choices] or ["- nothing measured"]
    out.append(f"- recorded in {recorded}" if recorded else "- not recorded (--no-record, or nothing measured)")
    out += ["", f"## Whole training step (`{STEP_RECIPE}` recipe)", ""]
    if step_note:
        out.append(step_note)
    else:
        ref = step_rows[-1].median_ms
        out += ["| backend | ms/step | p20-p80 | vs reference | first loss | note |", "|---|---:|---:|---:|---:|---|"]
        for s in step_rows:
            spread = f"{s.p20_ms:.1f}-{s.p80_ms:.1f}" if s.median_ms is not None else "-"
            ratio = ref / s.median_ms if ref is not None and s.median_ms is not None else None
            out.append(f"| {s.backend} | {_num(s.median_ms, 1)} | {spread} | {_num(ratio, 2)} | "
                       f"{_num(s.first_loss, 5)} | {s.note} |")
    return "\n".join(out) + "\n"


CSV_COLUMNS = ["date", "device", "capability", "driver", "cuda", *VERSIONED, "bandwidth_gb_s", "site", "shape",
               "dtype", "mode", "provider", "timer", "median_us", "p20_us", "p80_us", "bytes", "gb_per_s",
               "pct_bandwidth", "ratio_vs_reference", "note"]


def write_csv(path: Path, facts: dict[str, str], bandwidth: float, rows: list[kernels.Row]) -> None:
    """One line per kernel row, with the environment on every line."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            gbps = r.bytes / (r.median_us * 1e-6) / 1e9 if r.median_us is not None else None
            w.writerow({**{k: facts[k] for k in ("date", "device", "capability", "driver", "cuda", *VERSIONED)},
                        "bandwidth_gb_s": f"{bandwidth / 1e9:.1f}", "site": r.case.site, "shape": r.case.shape.key,
                        "dtype": r.case.dtype_name, "mode": r.mode, "provider": r.provider, "timer": r.timer,
                        "median_us": _num(r.median_us, 2, ""), "p20_us": _num(r.p20_us, 2, ""),
                        "p80_us": _num(r.p80_us, 2, ""), "bytes": f"{r.bytes:.0f}", "gb_per_s": _num(gbps, 2, ""),
                        "pct_bandwidth": _num(gbps and 100 * gbps * 1e9 / bandwidth, 1, ""),
                        "ratio_vs_reference": _num(r.ratios.get("reference"), 3, ""), "note": r.note})


def _step_config():
    from deepmlf_fast.config import with_av_widths
    from deepmlf_fast.presets import recipe

    cfg = with_av_widths(recipe(STEP_RECIPE))
    cfg.model.random_init = True  # timing needs the architecture, not its trained weights
    return cfg


def _num(x: float | None, digits: int, missing: str = "-") -> str:
    return missing if x is None else f"{x:.{digits}f}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()

