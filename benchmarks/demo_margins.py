"""The demo's fusion margins on this CPU's arithmetic path, for several seeds.

    python benchmarks/demo_margins.py                                  # seeds 1990-1992, precision auto
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/demo_margins.py --precision bf16 --overwrite
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/demo_margins.py --overwrite

Arguments are `deepmlf train`'s (default `--seeds 1990 1991 1992 --output-dir runs/demo-margins`).

Trains the README's default run (the `demo` recipe) once per seed, then for each seed reports
the test MAE of the task prediction and of every single head, the fusion-token head's margin
over the text head, the task prediction minus the fusion-token head, and how much the task and
fusion-token predictions worsen when every test sample gets another sample's audio and vision
(`tests/train/test_learning.py` asserts the same properties). Appends one record per seed, with the CPU model, capability, ISA caps,
precision and versions, to `benchmarks/results/demo_margins.json` and prints the rows of the
README's margin table.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

from deepmlf_fast.host import cpu_flags
from deepmlf_fast.hardware import device_facts
from deepmlf_fast.train.run import av_swap_maes, train_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "demo_margins.json"


def path_label(precision: str) -> str:
    """The arithmetic path in words: the instructions the products run on, the precision and
    any ISA cap in force."""
    flags = cpu_flags() or set()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if precision == "bf16":
        isa = ("AMX-BF16" if "amx_bf16" in flags and (not cap or "AMX" in cap) else
               "AVX512-BF16" if "avx512_bf16" in flags and "AVX2" not in cap else "emulated")
    else:
        isa = "AVX2" if torch.backends.cpu.get_cpu_capability() == "AVX2" else "AVX-512"
    caps = " ".join(f"{v}={os.environ[v]}" for v in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if v in os.environ)
    return f"{isa} {precision}{f' ({caps})' if caps else ''}"


def main(argv: list[str] | None = None) -> None:
    """`argv`: `deepmlf train` arguments (default seeds 1990 1991 1992, output runs/demo-margins)."""
    from deepmlf_fast.cli import build_parser, run_config_from_args

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--seeds" not in argv:
        argv += ["--seeds", "1990", "1991", "1992"]
    if "--output-dir" not in argv:
        argv += ["--output-dir", "runs/demo-margins"]
    args = build_parser().parse_args(["train", *argv])
    cfg = run_config_from_args(args)
    out = Path(cfg.train.output_dir)
    start = time.time()
    results = train_run(cfg, overwrite=args.overwrite)
    seconds = time.time() - start
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    facts = device_facts("cpu")
    records = []
    for seed in cfg.train.seeds:
        test = results["per_seed"][str(seed)]["test"]
        rec = {
            "date": dt.date.today().isoformat(), "cpu": facts.name, "path": path_label(resolved["precision"]),
            "precision": resolved["precision"], "precision_reason": resolved["precision_reason"],
            "seed": seed, "args": argv, "run_seconds_all_seeds": round(seconds, 1),
            **{k: test[k] for k in ("MAE", "MAE_text", "MAE_av", "MAE_fusion", "Corr")},
            "margin_text_minus_fusion": test["MAE_text"] - test["MAE_fusion"],
            **av_swap_maes(out, seed), "versions": versions(),
        }
        records.append(rec)
        print(f"| {rec['path']} | {seed} | {rec['MAE']:.3f} | {rec['MAE_text']:.3f} | {rec['MAE_av']:.3f} | "
              f"{rec['MAE_fusion']:.3f} | **{rec['margin_text_minus_fusion']:+.3f}** | {rec['MAE'] - rec['MAE_fusion']:+.3f} | "
              f"{rec['swapped_pred'] - rec['own_pred']:+.3f} / {rec['swapped_pred_fusion'] - rec['own_pred_fusion']:+.3f} |")
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(old + records, indent=1) + "\n")


if __name__ == "__main__":
    main()
