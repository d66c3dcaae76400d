"""Llama-7B architecture (random weights) on CPU: how building it and training DeepMLF around it
cost, for each `--quant` method, next to `deepmlf estimate-memory`.

    python3 -P benchmarks/bench_7b.py                                 # every method below, ~3-8 min each
    python3 -P benchmarks/bench_7b.py --quant int8-weight-only llm-int8

For each method, two fresh processes:
1. **build**: `load_backbone("llama-7b", random_init=True, quant=...)` alone; its peak resident
   memory against the final footprint (every parameter and buffer of the built model) plus one
   dense decoder layer;
2. **train**: the command of issue 19, `deepmlf train --data mosei8.pkl --dataset mosei
   --backbone llama-7b --random-init --quant ... --precision bf16 --mm-layers 15,31
   --batch-size 4 --epochs 1 --no-pretrain --seeds 1` (8/4/4 synthetic MOSEI samples: two
   training steps, the validation and test passes, the closing report), its peak resident
   memory (`getrusage` of the child), the build and epoch times from its log, against
   `estimate-memory`'s total for the same configuration.
Writes benchmarks/results/bench_7b_cpu.md and .json. Needs ~16 GB of memory for the 8-bit
methods (a dense bf16 7B backbone, `none`, needs ~22 GB and is not in the default list).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("int8-dynamic", "int8-weight-only", "fp8", "llm-int8", "nf4")
TRAIN = ["--dataset", "mosei", "--backbone", "llama-7b", "--random-init", "--precision", "bf16",
         "--mm-layers", "15,31", "--batch-size", "4", "--epochs", "1", "--no-pretrain", "--seeds", "1"]

PEAK = """
def _peak():
    status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
    return int(status["VmHWM"].split()[0]) * 1024
"""

BUILD = PEAK + """
import json, sys, time, torch
from deepmlf_fast.backbones.load import load_backbone
t0 = time.time()
lm = load_backbone("llama-7b", random_init=True, quant=sys.argv[1], dtype=torch.bfloat16).lm
seconds = time.time() - t0
c = lm.config
kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
dense_layer = 2 * (2 * c.hidden_size * (c.hidden_size + kv) + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size)
final = sum(t.numel() * t.element_size() for t in (*lm.parameters(), *lm.buffers()))
print(json.dumps({"seconds": seconds, "peak": _peak(), "final": final, "dense_layer": dense_layer}))
"""

TRAIN_PROC = PEAK + """
import json, sys
from deepmlf_fast.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "peak": _peak()}))
"""


def run_build(method: str) -> dict:
    out = subprocess.run([sys.executable, "-c", BUILD, method], capture_output=True, text=True, env=_env())
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_train(method: str, data: Path, out_dir: Path) -> dict:
    args = ["train", "--data", str(data), *TRAIN, "--quant", method, "--output-dir", str(out_dir), "--overwrite"]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", TRAIN_PROC, *args], capture_output=True, text=True, env=_env())
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    log = proc.stdout + proc.stderr  # the CLI logs to stdout
    stamps = {key: _stamp(log, pattern) for key, pattern in (
        ("start", r"device cpu"), ("built", r"loaded backbone"), ("finished", r"run finished"),
        ("report", r"report written"))}
    epoch_s = float(re.search(r"stage 2 \| epoch 1 .*\| (\d+)s", log).group(1))
    return {"wall": wall, "peak": res["peak"], "build_s": stamps["built"] - stamps["start"], "epoch_s": epoch_s,
            "report_s": stamps["report"] - stamps["finished"], "report_builds_backbone": log.count("loaded backbone") > 1}


def estimate(method: str) -> float:
    out = subprocess.run([sys.executable, "-m", "deepmlf_fast", "estimate-memory", *TRAIN[:4], "--precision",
                          "bf16", "--mm-layers", "15,31", "--batch-size", "4", "--zero", "0", "--quant", method],
                         capture_output=True, text=True, env=_env())
    return float(re.search(r"total \(estimate\)\s+([\d.]+)", out.stdout).group(1)) * 1024**3


def _stamp(log: str, pattern: str) -> float:
    line = next(line for line in log.splitlines() if re.search(pattern, line))
    h, m, s = (int(x) for x in line[:8].split(":"))
    return h * 3600 + m * 60 + s


def _env() -> dict:
    return {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu"], default="cpu")
    p.add_argument("--quant", nargs="+", default=list(METHODS))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from harness import describe_device, git_commit, versions

    from deepmlf_fast.data.synthetic import make_synthetic

    gib = 1024**3
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic(Path(tmp) / "mosei8.pkl", "mosei", 8, 4, 4, seed=0)
        for method in args.quant:
            build = run_build(method)
            train = run_train(method, data, Path(tmp) / method)
            est = estimate(method)
            row = {"quant": method, "build_s": round(build["seconds"], 1),
                   "build_peak_gib": round(build["peak"] / gib, 2), "final_gib": round(build["final"] / gib, 2),
                   "final_plus_layer_gib": round((build["final"] + build["dense_layer"]) / gib, 2),
                   "build_peak_over_final_plus_layer": round(build["peak"] / (build["final"] + build["dense_layer"]), 3),
                   "train_build_s": train["build_s"], "epoch_s": train["epoch_s"], "run_wall_s": round(train["wall"], 1),
                   "report_s": train["report_s"], "report_builds_backbone": train["report_builds_backbone"],
                   "run_peak_gib": round(train["peak"] / gib, 2), "estimate_gib": round(est / gib, 2),
                   "run_peak_over_estimate": round(train["peak"] / est, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write(args.out, rows, describe_device("cpu").name, versions(), git_commit())
    return 0


def write(out: Path, rows: list[dict], device: str, v: dict, commit: str) -> None:
    """Write the JSON and Markdown tables; rows of methods not run now are kept from the last
    record on the same device, each with its own commit and date."""
    out.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().isoformat()
    rows = [{**r, "commit": commit, "date": today} for r in rows]
    path = out / "bench_7b_cpu.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("device") == device:
            run_now = {r["quant"] for r in rows}
            kept = [{"commit": old.get("commit"), "date": old.get("date"), **r} for r in old["rows"]
                    if r["quant"] not in run_now]
            rows = sorted(kept + rows, key=lambda r: METHODS.index(r["quant"]) if r["quant"] in METHODS else 99)
    path.write_text(json.dumps({"device": device, "versions": v, "rows": rows}, indent=1) + "\n")
    import torch

    lines = [
        "# Llama-7B architecture on CPU: build, train, report (`benchmarks/bench_7b.py`)", "",
        f"- device: {device}; ATen ISA path {torch.backends.cpu.get_cpu_capability()}; torch {v['torch']}, "
        f"transformers {v['transformers']}; each row's commit and date in its last columns",
        f"- train: `deepmlf train --data mosei8.pkl {' '.join(TRAIN)} --quant <method>` (8/4/4 synthetic MOSEI "
        "samples: 2 training steps, validation, test, report)",
        "- build: `load_backbone` alone in a fresh process; final = every parameter and buffer of the built "
        "model; one dense layer = a Llama-7B decoder layer in bf16 (405 MB)", "",
        "| quant | build s | build peak GiB | final + 1 layer GiB | build peak / (final + layer) | epoch s "
        "| run wall s | report s (second build?) | run peak GiB | estimate GiB | run peak / estimate | commit | date |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    lines += [f"| {r['quant']} | {r['build_s']} | {r['build_peak_gib']} | {r['final_plus_layer_gib']} | "
              f"{r['build_peak_over_final_plus_layer']} | {r['epoch_s']} | {r['run_wall_s']} | {r['report_s']} "
              f"({'yes' if r['report_builds_backbone'] else 'no'}) | {r['run_peak_gib']} | {r['estimate_gib']} | "
              f"{r['run_peak_over_estimate']} | {r['commit']} | {r['date']} |" for r in rows]
    (out / "bench_7b_cpu.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'bench_7b_cpu.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
