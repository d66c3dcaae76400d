"""`deepmlf` command line: train | eval | predict | report | sweep | make-synthetic | convert-data |
estimate-memory | presets | env | bench.

    deepmlf train                                   # embedded default: synthetic MOSI + SmolLM2-135M
    deepmlf train --data unaligned_50.pkl --dataset mosi --backbone gpt2 --output-dir runs/mosi
    deepmlf train --preset mosei-gpt2-large --data mosei/unaligned_50.pkl
    deepmlf eval --run runs/mosi [--data other.pkl] [--split test]
    deepmlf predict --run runs/mosi --out predictions.csv [--data new_samples.pkl]
    deepmlf report runs/mosi [runs/mosi-8tok ...] [--out DIR]
    deepmlf sweep --grid fusion.n_tokens=4,8,12,20 --grid fusion.mm_layers=depth:1,3,5,7 --output-dir sweeps/mosi
    deepmlf estimate-memory --backbone llama-7b --dataset mosei --load-in-8bit --zero 2 --batch-size 32
    deepmlf env                                     # versions, device, what --precision auto picks here
    deepmlf bench                                   # on a GPU: self-check, kernel and step timings, tables
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from deepmlf_fast.errors import DeepMLFError
from deepmlf_fast.report.classes import CLASS_RULES


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from deepmlf_fast.backbones.registry import BACKBONES
    from deepmlf_fast.config import DataConfig, choices

    g = p.add_argument_group("what to train")
    g.add_argument("--data", help="MMSA .pkl (trusted sources only) or converted .npz; default: embedded synthetic data")
    g.add_argument("--dataset", choices=choices("data.dataset"),
                   help=f"dataset the file holds (default {DataConfig.dataset})")
    g.add_argument("--preset", help="a named recipe (see `deepmlf presets`); default: the dataset's released recipe, "
                                    "or `demo` without --data")
    g.add_argument("--backbone", help=f"backbone preset ({', '.join(BACKBONES)}), a local checkpoint dir, or a cached "
                                      "hub id")
    g.add_argument("--config", help="JSON file with a full RunConfig (written by a previous run as config.json)")
    g = p.add_argument_group("overrides")
    g.add_argument("--output-dir", help="run directory (default runs/<preset>)")
    g.add_argument("--epochs", type=int, help="maximum stage-2 epochs")
    g.add_argument("--pretrain-epochs", type=int, help="maximum stage-1 (AV encoder) epochs")
    g.add_argument("--no-pretrain", action="store_true", help="skip stage 1 (AV encoder from scratch)")
    g.add_argument("--seeds", type=int, nargs="+", help="one run per seed; results report mean and std")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--grad-accum", type=int)
    g.add_argument("--lr", type=float, help="learning rate of both parameter sides")
    g.add_argument("--mm-layers", help="comma-separated 0-based LM blocks followed by an MM block")
    g.add_argument("--fusion-tokens", type=int)
    g.add_argument("--parity", choices=choices("model.parity"), help="reproduce the official code's numerics")
    g.add_argument("--precision", choices=choices("train.precision"),
                   help="backbone weights + autocast; auto (default): the recipe's, but bf16 only where the "
                        "device runs it natively (see `deepmlf env`)")
    g.add_argument("--tf32", action="store_true", help="fp32 matrix products on TF32 tensor cores (CUDA)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--backend", choices=choices("train.backend"), help="attention op backend")
    g.add_argument("--av-length-masks", action="store_true", help="use per-sample AV lengths (masks)")
    g.add_argument("--recompute-lm-blocks", action="store_true",
                   help="activation checkpointing of the frozen LM blocks (less memory, ~15%% more time)")
    g.add_argument("--quant", choices=choices("model.quant"),
                   help="8-bit/4-bit frozen backbone linears: int8-dynamic (int8 weights and per-row int8 "
                        "activations, int8 GEMM; the fastest 8-bit measured on an AMX CPU), int8-weight-only (int8 weights, "
                        "dense GEMM; closest to bf16's numbers), fp8 (e4m3; an FP8 GEMM on sm_90+ GPUs), llm-int8, "
                        "nf4 (bitsandbytes)")
    g.add_argument("--load-in-8bit", action="store_true", help="same as --quant llm-int8")
    g.add_argument("--load-in-4bit", action="store_true", help="same as --quant nf4")
    g.add_argument("--random-init", action="store_true", help="backbone architecture with random weights")
    g.add_argument("--skip-nonfinite", type=int, metavar="N",
                   help="skip up to N optimiser steps whose loss or gradient is NaN/inf (logged) instead of "
                        "stopping at the first (default 0)")
    g.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="set any configuration field by its dotted path, e.g. --set fusion.dropout=0.2 "
                        "--set optim.eta_min=1e-6 (repeatable; applied after every other flag)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir even if training settings changed "
                        "(an identical configuration continues without it)")
    g.add_argument("--overwrite", action="store_true", help="delete --output-dir first")
    g.add_argument("--deepspeed", metavar="CONFIG",
                   help="train with DeepSpeed using this JSON config (configs/deepspeed/*.json); launch through "
                        "`deepspeed train.py` or `torchrun train.py` for several GPUs; --batch-size is then per GPU")


OVERRIDES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("epochs", ("optim.max_epochs",)),
    ("pretrain_epochs", ("pretrain.max_epochs",)),
    ("batch_size", ("optim.batch_size",)),
    ("grad_accum", ("optim.grad_accum",)),
    ("lr", ("optim.lr_mm", "optim.lr_av")),
    ("mm_layers", ("model.fusion.mm_layers",)),
    ("fusion_tokens", ("model.fusion.n_tokens",)),
    ("parity", ("model.parity",)),
    ("precision", ("train.precision",)),
    ("device", ("train.device",)),
    ("backend", ("train.backend",)),
    ("deepspeed", ("train.deepspeed",)),
    ("quant", ("model.quant",)),
    ("seeds", ("train.seeds",)),
    ("skip_nonfinite", ("train.skip_nonfinite",)),
    ("output_dir", ("train.output_dir",)),
)
"""`deepmlf train` option (argparse dest) -> the configuration fields it sets, when given."""

SWITCHES: tuple[tuple[str, str, object], ...] = (
    ("av_length_masks", "model.av.length_masks", True),
    ("recompute_lm_blocks", "model.recompute_lm_blocks", True),
    ("load_in_8bit", "model.quant", "llm-int8"),
    ("load_in_4bit", "model.quant", "nf4"),
    ("random_init", "model.random_init", True),
    ("tf32", "train.tf32", True),
    ("no_pretrain", "pretrain.enabled", False),
)
"""`deepmlf train` switch -> the field it sets and the value, when the switch is on."""


def run_config_from_args(args: argparse.Namespace):
    """Build the RunConfig a `train` invocation asks for: the base (--config, --preset, the
    dataset's recipe or the demo), --dataset/--data/--backbone, then the override table and
    --set. Reads only configuration files (and a backbone's config for --backbone)."""
    from deepmlf_fast.config import RunConfig, apply_overrides, parse_value
    from deepmlf_fast.errors import ConfigError
    from deepmlf_fast.fileio import read_json
    from deepmlf_fast.presets import adapt_to_backbone, recipe, recipe_for_dataset

    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise ConfigError("--resume and --overwrite: expected at most one (--resume continues the run in "
                          "--output-dir, --overwrite deletes it first), found both")
    if getattr(args, "no_pretrain", False) and getattr(args, "pretrain_epochs", None) is not None:
        raise ConfigError(f"--pretrain-epochs: expected none with --no-pretrain (stage 1 is skipped), found "
                          f"{args.pretrain_epochs}")
    if args.config:
        cfg = RunConfig.from_dict(read_json(args.config, "--config", ConfigError))
    elif args.preset:
        cfg = recipe(args.preset)
    elif args.data is None:
        cfg = recipe("demo")
    else:
        cfg = recipe_for_dataset(args.dataset or "mosi")
    if args.dataset and args.dataset != cfg.data.dataset:
        if args.preset or args.config:
            raise ConfigError(f"--dataset {args.dataset} contradicts the preset's dataset {cfg.data.dataset}")
        cfg = apply_overrides(cfg, {"data.dataset": args.dataset})
    if args.data:
        cfg = apply_overrides(cfg, {"data.path": args.data})
    if args.backbone and args.backbone != cfg.model.backbone:
        cfg = adapt_to_backbone(cfg, args.backbone)
    if not args.output_dir and not args.config:
        cfg = apply_overrides(cfg, {"train.output_dir": f"runs/{args.preset or ('demo' if args.data is None else cfg.data.dataset)}"})
    changes: dict = {}
    for dest, paths in OVERRIDES:
        value = getattr(args, dest)
        if value is not None:
            if dest == "mm_layers":
                value = parse_value(paths[0], value)
            changes.update({path: value for path in paths})
    quant = {flag: value for flag, value in (("--quant", args.quant), ("--load-in-8bit", args.load_in_8bit and "llm-int8"),
                                             ("--load-in-4bit", args.load_in_4bit and "nf4")) if value}
    if len(set(quant.values())) > 1:
        raise ConfigError("model.quant: expected one quantization, found "
                          + " and ".join(f"{flag} ({value})" for flag, value in quant.items()))
    changes.update({path: value for dest, path, value in SWITCHES if getattr(args, dest)})
    for item in args.set:
        path, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set: expected PATH=VALUE like fusion.dropout=0.2, found {item!r}")
        changes[path.strip()] = parse_value(path.strip(), text)
    return apply_overrides(cfg, changes)


def cmd_train(args) -> int:
    from deepmlf_fast.report import report_after_training
    from deepmlf_fast.train import distributed
    from deepmlf_fast.train.run import run_training
    from deepmlf_fast.train.rundir import RunDir

    cfg = run_config_from_args(args)
    _, session = run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    writer = distributed.is_main()  # read before leaving the process group, after which every rank is "0"
    if writer:
        print(f"results: {RunDir(cfg.train.output_dir).results}")
    distributed.shutdown()
    if writer and not getattr(args, "no_report", False):  # train.py's parser has no --no-report
        report = report_after_training(cfg.train.output_dir, cfg.train.device, session=session)
        if report is not None:
            print(f"report: {report} (and report.html)")
    return 0


def cmd_sweep(args) -> int:
    from deepmlf_fast.report.sweep import write_summary
    from deepmlf_fast.train import distributed
    from deepmlf_fast.train.sweep import run_sweep

    cfg = run_config_from_args(args)
    sweep_dir = Path(args.output_dir) if args.output_dir else Path("sweeps") / Path(cfg.train.output_dir).name
    sweep = run_sweep(cfg, args.grid, sweep_dir, resume=args.resume, overwrite=args.overwrite)
    if distributed.is_main():
        summary = write_summary(sweep_dir, sweep.axes, sweep.cells)
        print(f"summary: {sweep_dir / 'summary.md'} ({len(summary['cells'])} cells)")
    distributed.shutdown()
    return 0


def cmd_report(args) -> int:
    from deepmlf_fast.errors import ConfigError
    from deepmlf_fast.report import matplotlib_available
    from deepmlf_fast.report.writer import write_report

    if not matplotlib_available():
        raise ConfigError("deepmlf report needs matplotlib: pip install 'deepmlf-fast[report]'")
    if args.attention_samples < 1:
        raise ConfigError(f"--attention-samples: expected an integer >= 1, found {args.attention_samples}")
    out = write_report(args.runs, args.out, seed=args.seed, n_attention=args.attention_samples, device=args.device)
    print(f"written {out} and {out.with_suffix('.html')}")
    return 0


def cmd_estimate_memory(args) -> int:
    from deepmlf_fast.config import validate_config
    from deepmlf_fast.errors import ConfigError
    from deepmlf_fast.memory import estimate_memory
    from deepmlf_fast.presets import DATASET_RECIPE
    from deepmlf_fast.train.deepspeed_config import load_deepspeed_config, stage_of

    if not (args.preset or args.config):  # the dataset's released recipe, not the synthetic demo
        args.preset = DATASET_RECIPE[args.dataset or "mosi"]
    cfg = run_config_from_args(args)
    validate_config(cfg)
    if args.gpus < 1:
        raise ConfigError(f"--gpus: expected an integer >= 1, found {args.gpus}")
    if args.text_tokens is not None and args.text_tokens < 1:
        raise ConfigError(f"--text-tokens: expected an integer >= 1, found {args.text_tokens}")
    zero, offload = args.zero, args.offload
    if args.deepspeed:
        ds = load_deepspeed_config(args.deepspeed)
        zero = stage_of(ds) if zero is None else zero
        offload = offload or ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    est = estimate_memory(cfg, zero=2 if zero is None else zero, gpus=args.gpus, offload=offload,
                          text_tokens=args.text_tokens)
    print(est.format())
    return 0


def _trained_split(args, require_labels: bool = True):
    """-> (session, model, loader) for `eval`/`predict` on the requested split."""
    from deepmlf_fast.hardware import resolve_device
    from deepmlf_fast.train.run import load_run

    session, model = load_run(args.run, resolve_device(args.device), args.seed, args.data, require_labels)
    return session, model, session.loader(args.split, session.cfg.train.eval_batch_size, False)


def cmd_eval(args) -> int:
    from deepmlf_fast.fileio import write_json
    from deepmlf_fast.metrics import format_metrics, metric_keys
    from deepmlf_fast.train.evaluate import evaluate

    session, model, loader = _trained_split(args)
    dataset = session.cfg.data.dataset
    metrics = evaluate(model, loader, dataset, session.eval_ctx, desc=args.split)
    print(format_metrics({k: metrics[k] for k in metric_keys(dataset)}))
    out = Path(args.run) / f"eval_{args.split}.json"
    write_json(out, {"split": args.split, "data": session.data.source, "metrics": metrics})
    print(f"written {out}")
    return 0


def cmd_predict(args) -> int:
    from deepmlf_fast.errors import ConfigError
    from deepmlf_fast.fileio import atomic_path, check_output
    from deepmlf_fast.report.classes import class_names, sentiment_classes
    from deepmlf_fast.train.evaluate import HEADS, predict

    out = check_output(args.out or Path(args.run) / f"predictions_{args.split}.csv",
                       "--out" if args.out else "--out (default: in the run; give --out elsewhere)", ConfigError,
                       directory=False)
    session, model, loader = _trained_split(args, require_labels=False)
    p = predict(model, loader, session.eval_ctx, desc=args.split)
    ids = session.data.split(args.split).ids
    dataset = session.cfg.data.dataset
    names = class_names(dataset)
    label_class, pred_class = sentiment_classes(p["labels"], dataset), sentiment_classes(p["pred"], dataset)
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "label_class", *HEADS, "pred_class"])
        for i in range(len(p["pred"])):
            labelled = label_class[i] >= 0  # unlabeled samples (NaN labels) leave both label columns empty
            w.writerow([ids[int(p["index"][i])], f"{p['labels'][i]:.6g}" if labelled else "",
                        names[label_class[i]] if labelled else "", *(f"{p[h][i]:.6g}" for h in HEADS),
                        names[pred_class[i]]])
    print(f"written {out} ({len(p['pred'])} rows)")
    return 0


def cmd_make_synthetic(args) -> int:
    from deepmlf_fast.data import make_synthetic
    from deepmlf_fast.errors import ConfigError
    from deepmlf_fast.fileio import check_output

    if args.seed < 0:
        raise ConfigError(f"--seed: expected an integer >= 0, found {args.seed}")
    check_output(args.out, "--out", ConfigError, directory=False)
    if Path(args.out).suffix != f".{args.format}":  # the reader goes by content, a user by the name
        raise ConfigError(f"--out: expected a .{args.format} path for --format {args.format}, found {args.out!r}")
    path = make_synthetic(args.out, args.dataset, args.n_train, args.n_valid, args.n_test, aligned=args.aligned,
                          seed=args.seed, fmt=args.format)
    print(f"written {path}")
    return 0


def cmd_convert(args) -> int:
    from deepmlf_fast.data import convert_pickle
    from deepmlf_fast.errors import ConfigError
    from deepmlf_fast.fileio import check_output

    check_output(args.dst, "dst", ConfigError, directory=False)
    if Path(args.dst).resolve() == Path(args.src).resolve():
        raise ConfigError(f"dst: expected a path other than the source, found {args.dst!r} (it would replace "
                          f"the pickle)")
    if Path(args.dst).suffix != ".npz":
        raise ConfigError(f"dst: expected a .npz path (convert-data writes the .npz format), found {args.dst!r}")
    print(f"written {convert_pickle(args.src, args.dst, args.dataset)}")
    return 0


def cmd_presets(args) -> int:
    from deepmlf_fast.backbones.registry import BACKBONES
    from deepmlf_fast.presets import RECIPES

    from deepmlf_fast.presets import recipe

    print("recipes (--preset):")
    for name in RECIPES:
        cfg = recipe(name)
        f = cfg.model.fusion
        print(f"  {name:20s} dataset={cfg.data.dataset:5s} backbone={cfg.model.backbone:14s} "
              f"fusion_tokens={f.n_tokens} mm_layers={list(f.mm_layers)}")
    print("backbones (--backbone):")
    for name, b in BACKBONES.items():
        print(f"  {name:14s} {b.description}")
    return 0


def cmd_env(args) -> int:
    from deepmlf_fast.hardware import environment_report, format_report

    report = environment_report(args.device)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_bench(args) -> int:
    from deepmlf_fast.bench import command

    opts = command.check_options(args.device, args.out, args.steps, record=not args.no_record)
    plan = command.plan_lines(opts)
    if args.dry_run or opts.device.type != "cuda":
        if not args.dry_run:
            print(f"deepmlf bench measures the Triton kernels on a CUDA GPU; {opts.device} is not one, so nothing "
                  "was run. On a GPU it would run:")
        print("\n".join(plan))
        return 0
    md, csv_path = command.run(opts)
    print(md.read_text())
    print(f"wrote {md} and {csv_path}")
    return 0


PREDICT_DESCRIPTION = """\
Write one CSV row per sample: id, label, label_class, pred (the multimodal prediction),
pred_text, pred_av, pred_fusion (each head's; fusion: mean over the fusion tokens) and
pred_class. --data may hold new samples without regression_labels (label and label_class
are then empty), and need hold only the split it is predicted on.

""" + CLASS_RULES


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (argparse prints the whole usage first), like
    every other input error of the CLI; subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from deepmlf_fast.config import DataConfig, choices
    from deepmlf_fast.data.mmsa import SPLITS

    parser = ArgumentParser(prog="deepmlf", description="DeepMLF multimodal sentiment analysis")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train DeepMLF (both curriculum stages, every seed)")
    _add_train_args(p)
    p.add_argument("--no-report", action="store_true",
                   help="skip the report (report.md/.html) written at the end when matplotlib is installed")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="train a grid of configurations x seeds; summary table and ablation plots",
                       description="Train one run per point of a grid over configuration fields, one after "
                                   "another, into OUTPUT_DIR/<cell>/ (default sweeps/<preset>); finished cells "
                                   "are skipped, so rerunning the command resumes the sweep. Takes every `train` "
                                   "argument (they set the base configuration of every cell; --seeds sets each "
                                   "cell's seeds) plus --grid.")
    _add_train_args(p)
    p.add_argument("--grid", action="append", required=True, metavar="PATH=VALUES",
                   help="a grid field and its values: fusion.n_tokens=4,8,12 (comma-separated); tuple fields "
                        "separate values with ';': 'fusion.mm_layers=3,5;5,7'; fusion.mm_layers=depth:1,3,5 "
                        "places k MM blocks evenly from the recipe's first MM block to the last LM block "
                        "(repeatable: the grid is the product)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="write report.md and report.html (plots, metrics, setup) of finished runs",
                       description="Metric table (runs side by side), predicted-vs-true scatter, confusion "
                                   "matrix, loss/validation curves, learning rate, MM gate values, fusion-token "
                                   "attention maps, configuration, hardware, versions and wall time. Needs "
                                   "matplotlib (pip install 'deepmlf-fast[report]').")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by `deepmlf train`")
    p.add_argument("--out", help="folder for report.md/report.html/report/ (default: the run directory for one "
                                 "run, the first run's parent for several)")
    p.add_argument("--seed", type=int, help="whose model draws the scatter, confusion and attention plots "
                                            "(default: each run's first seed)")
    p.add_argument("--attention-samples", type=int, default=4, help="test samples in the attention figure (4)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_report)

    for name, func, helptext in (("eval", cmd_eval, "metrics of a trained run"),
                                 ("predict", cmd_predict, "write predictions of a trained run to CSV")):
        p = sub.add_parser(name, help=helptext, description=PREDICT_DESCRIPTION if name == "predict" else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--run", required=True, help="run directory written by `deepmlf train`")
        p.add_argument("--data", help="data file (default: the run's own)")
        p.add_argument("--split", default="test", choices=SPLITS)
        p.add_argument("--seed", type=int, help="which seed's model (default: the first)")
        p.add_argument("--device", default="auto")
        if name == "predict":
            p.add_argument("--out", help="CSV path (default RUN/predictions_<split>.csv)")
        p.set_defaults(func=func)

    p = sub.add_parser("make-synthetic", help="write MMSA-format synthetic data with real transcripts")
    p.add_argument("--out", required=True)
    p.add_argument("--dataset", default=DataConfig.dataset, choices=choices("data.dataset"))
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-valid", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--aligned", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["pkl", "npz"], default="pkl")
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser("convert-data", help="convert an MMSA pickle to the safe .npz format")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dataset", required=True, choices=choices("data.dataset"))
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("estimate-memory", help="estimate per-GPU memory of a (DeepSpeed) training run",
                       description="Per-GPU memory of training a recipe: frozen weights, trained parameters, "
                                   "gradients, optimizer state and activations, with the assumptions listed. "
                                   "Takes the same arguments as `train` (no weights or data are loaded).")
    _add_train_args(p)
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="ZeRO stage (default: --deepspeed config's, else 2)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel ranks (default 1)")
    p.add_argument("--offload", action="store_true", help="CPU optimizer offload")
    p.add_argument("--text-tokens", type=int, help="tokens per transcript (default: the recipe's maximum, the worst batch)")
    p.set_defaults(func=cmd_estimate_memory)

    p = sub.add_parser("presets", help="list recipes and backbones")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("env", help="versions, device, native bf16, Triton, bitsandbytes, and what `auto` picks here",
                       description="What a bug report needs: library versions, the device and its CPU capability, "
                                   "whether bf16 is native, whether the Triton kernels can run, the bitsandbytes "
                                   "backend, and the precision and attention backend `--precision auto` / "
                                   "`--backend auto` pick on this machine.")
    p.add_argument("--device", default="auto", help="device to describe (default: CUDA if present, else CPU)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("bench", help="on a GPU: kernel self-check, kernel and whole-step timings, Markdown/CSV tables",
                       description="For anyone with a GPU: runs the kernels' first-contact self-check, times our "
                                   "attention kernels against SDPA, FlexAttention and flash-attn (where installed) "
                                   "at the recipes' shapes (us per call, %% of the measured copy bandwidth), times a "
                                   "few training steps of the demo recipe with each backend, records which backend "
                                   "`--backend auto` runs at each attention site on this device, and writes "
                                   "bench-<device>-<date>.md/.csv. Takes a few minutes. On a CPU it prints what it "
                                   "would run and exits 0.")
    p.add_argument("--device", default="auto", help="cuda, cuda:N (default: CUDA if present, else CPU)")
    p.add_argument("--out", default="deepmlf-bench", help="folder of the tables (default ./deepmlf-bench)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per backend (default 10)")
    p.add_argument("--no-record", action="store_true",
                   help="do not record auto's per-site choice for this device (measure only)")
    p.add_argument("--dry-run", action="store_true", help="print what it would run and exit")
    p.set_defaults(func=cmd_bench)
    return parser


class _BitsandbytesHubKernelNote(logging.Filter):
    """Replaces bitsandbytes' import-time warning on a CPU with AVX512-BF16 ("Failed to load CPU
    gemm_4bit_forward from kernels-community ... pip install kernels"), which reads as an error and
    whose advice would make it download a kernel from the Hub at run time, by one plain INFO line."""

    PREFIX = "Failed to load CPU gemm_4bit_forward from kernels-community"
    NOTE = ("bitsandbytes: 4-bit products on this CPU use its built-in kernel (its optional kernel "
            "from the Hugging Face Hub is not loaded: nothing is downloaded at run time)")

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.PREFIX):
            return True
        record.levelno, record.levelname, record.msg, record.args = logging.INFO, "INFO", self.NOTE, ()
        return logging.getLogger().isEnabledFor(logging.INFO)


def setup_logging(quiet: bool) -> None:
    """Log to stdout (INFO, or WARNING when `quiet`); quiet also silences progress bars, so
    stderr carries nothing but warnings and errors."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    for noisy in ("transformers", "DeepSpeed", "deepspeed", "torch", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    bnb_cpu = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _BitsandbytesHubKernelNote) for f in bnb_cpu.filters):
        bnb_cpu.addFilter(_BitsandbytesHubKernelNote())
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # read by tqdm when a bar is created
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `deepmlf` command; returns the exit status."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run a parsed command (`args.func`) with the CLI's logging and error reporting: every
    `DeepMLFError` becomes one `error: ...` line on stderr and exit status 2 (`--debug`: the
    traceback too)."""
    setup_logging(args.quiet)
    try:
        return args.func(args)
    except DeepMLFError as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
