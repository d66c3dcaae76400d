"""A whole run: data, both curriculum stages for every seed, test metrics, results.json.

    load + validate data -> tokenize each split once -> load the frozen backbone once
    for each seed: stage 1 (AV encoder) -> stage 2 (DeepMLF, early stopping) -> test
    -> DIR/results.json (test metrics averaged over seeds, with std and per-seed details)

A run directory can be resumed: finished seeds are skipped, an interrupted seed restarts
from its last completed epoch.

With `train.deepspeed` set, every rank of the launch runs `train_run`: each trains on its
shard through a `DeepSpeedEngine`, and only rank 0 writes (see `train/distributed.py`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from deepmlf_fast.backbones.load import load_backbone
from deepmlf_fast.config import RunConfig
from deepmlf_fast.data import MMSAData, load_mmsa, make_loader, make_synthetic, pad_token_id, tokenize_texts
from deepmlf_fast.data.specs import dataset_spec
from deepmlf_fast.errors import CheckpointError, ConfigError, DataError
from deepmlf_fast.fileio import cache_dir
from deepmlf_fast.metrics import METRIC_KEYS, format_metrics
from deepmlf_fast.model.build import DTYPES
from deepmlf_fast.model.deepmlf import DeepMLF
from deepmlf_fast.train import distributed
from deepmlf_fast.train.checkpoint import load_weights, write_json
from deepmlf_fast.train.engine import PlainEngine
from deepmlf_fast.train.evaluate import eval_in_bf16, evaluate
from deepmlf_fast.train.loop import fit
from deepmlf_fast.train.optim import build_optimizer, schedule_for
from deepmlf_fast.train.pretrain import load_av_encoder, pretrain_av

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def demo_data_path(cfg: RunConfig) -> Path:
    """The embedded synthetic data file for `cfg.data` (generated once into the cache)."""
    d = cfg.data
    n_train, n_valid, n_test = d.synthetic_sizes
    path = cache_dir() / "data" / f"synthetic-{d.dataset}-{n_train}-{n_valid}-{n_test}-s{d.synthetic_seed}.pkl"
    if not path.exists():
        log.info("generating embedded synthetic %s data -> %s", d.dataset, path)
        make_synthetic(path, d.dataset, n_train, n_valid, n_test, seed=d.synthetic_seed)
    return path


def load_run_data(cfg: RunConfig) -> MMSAData:
    """Load and validate the run's data (the embedded synthetic default when no path)."""
    path = cfg.data.path or demo_data_path(cfg)
    return load_mmsa(path, cfg.data.dataset, cfg.data.audio_dim, cfg.data.vision_dim)


def with_data_dims(cfg: RunConfig, data: MMSAData) -> RunConfig:
    """Set the AV encoder's input widths from the (validated) data."""
    da, dv = data.feature_dims
    av = dataclasses.replace(cfg.model.av, audio_dim=da, vision_dim=dv)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, av=av))


def check_data_matches_model(cfg: RunConfig, data: MMSAData) -> None:
    """A saved model only reads data with the feature widths it was trained on."""
    da, dv = data.feature_dims
    for name, want, found in (("audio", cfg.model.av.audio_dim, da), ("vision", cfg.model.av.vision_dim, dv)):
        if want != found:
            raise DataError(
                f"{data.source}: {name} feature width {found} does not match the model, which was trained with {want}"
            )


def build_engine(model: DeepMLF, cfg: RunConfig, n_batches: int, seed_dir: Path | None = None):
    """AdamW groups + warmup/cosine schedule + accumulation/clipping per the parity flags;
    a `DeepSpeedEngine` (checkpoints in `seed_dir/deepspeed`) when `train.deepspeed` is set."""
    if cfg.train.deepspeed:
        from deepmlf_fast.train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, n_batches, Path(seed_dir or cfg.train.output_dir) / "deepspeed")
    flags = cfg.model.flags
    optimizer = build_optimizer(model, cfg.optim, flags)
    params = [p for p in model.parameters() if p.requires_grad]
    mm_side = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("av_encoder.")]
    engine = PlainEngine(
        params, optimizer, None, accum=cfg.optim.grad_accum, clip=cfg.optim.grad_clip, flags=flags,
        value_clip_params=mm_side,
    )
    engine.scheduler = schedule_for(optimizer, cfg.optim, max(engine.steps_per_epoch(n_batches), 1))
    return engine


class Session:
    """Everything loaded once per run and shared by its seeds: data, tokens, backbone."""

    def __init__(self, cfg: RunConfig, device: torch.device, data: MMSAData | None = None):
        self.device = device
        self.data = data if data is not None else load_run_data(cfg)
        self.cfg = with_data_dims(cfg, self.data)
        m = self.cfg.model
        self.lm, self.tokenizer, self.spec = load_backbone(
            m.backbone, dtype=DTYPES[m.backbone_dtype], load_in_8bit=m.load_in_8bit,
            load_in_4bit=m.load_in_4bit, random_init=m.random_init, device=device,
        )
        self.pad_id = pad_token_id(self.tokenizer)
        self.tokens = {
            name: tokenize_texts(self.data.split(name).raw_text, self.tokenizer, m.text.max_tokens, name)
            for name in ("train", "valid", "test")
        }

    def loader(self, split: str, batch_size: int, shuffle: bool, seed: int | None = None, shard: bool = True):
        """A loader over `split`; in a distributed run each rank reads its shard unless `shard=False`."""
        return make_loader(
            self.data.split(split), self.tokens[split], self.pad_id, batch_size, shuffle, seed=seed,
            num_workers=self.cfg.data.num_workers,
            rank=distributed.rank() if shard else 0, world_size=distributed.world_size() if shard else 1,
        )

    def new_model(self, seed: int) -> DeepMLF:
        model = DeepMLF(self.cfg.model, self.lm, self.spec, self.pad_id, init_seed=seed)
        model.set_backend(self.cfg.train.backend)
        return model


def train_run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run every seed of `cfg` into `cfg.train.output_dir`; -> the results dict also written
    to `results.json` (test metrics under their MMSA names, averaged over seeds).

    Inputs (run directory, data, backbone) are all validated before anything is written,
    so a bad argument leaves no half-made run directory behind."""
    run_dir = Path(cfg.train.output_dir)
    _check_run_dir(run_dir, cfg, resume, overwrite)
    if cfg.train.deepspeed:  # every rank runs this function; only rank 0 writes files
        from deepmlf_fast.train.deepspeed_config import deepspeed_config_for

        distributed.init_process_group()
        deepspeed_config_for(cfg, distributed.world_size())  # fail before loading anything
        device = distributed.local_device(cfg.train.device)
    else:
        device = resolve_device(cfg.train.device)
    start = time.time()
    with distributed.rank_zero_first():  # rank 0 fills shared caches (tiny backbones, synthetic data)
        session = Session(cfg, device)
    if distributed.is_main():
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    if not distributed.is_main():
        return _train_seeds(session, run_dir)
    file_log = logging.FileHandler(run_dir / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logging.getLogger("deepmlf_fast").addHandler(file_log)
    try:
        results = _train_seeds(session, run_dir)
    finally:
        logging.getLogger("deepmlf_fast").removeHandler(file_log)
        file_log.close()
    results["seconds"] = round(time.time() - start, 1)
    write_json(run_dir / "results.json", results)
    return results


def _train_seeds(session: "Session", run_dir: Path) -> dict:
    cfg = session.cfg
    if distributed.is_main():
        write_json(run_dir / "config.json", cfg.to_dict())
    log.info("data %s: %d/%d/%d samples, audio %s, vision %s | backbone %s | device %s",
             session.data.source, len(session.data.train), len(session.data.valid), len(session.data.test),
             session.data.train.audio.shape[1:], session.data.train.vision.shape[1:], cfg.model.backbone,
             session.device)
    per_seed = {}
    for seed in cfg.train.seeds:
        per_seed[str(seed)] = _run_seed(session, seed, run_dir / f"seed_{seed}")
    results = aggregate(per_seed, cfg)
    log.info("test (mean over %d seed%s): %s", len(per_seed), "s" * (len(per_seed) > 1),
             format_metrics({k: results[k] for k in METRIC_KEYS[cfg.data.dataset]}))
    return results


def _run_seed(session: Session, seed: int, seed_dir: Path) -> dict:
    cfg = session.cfg
    done = seed_dir / "result.json"
    if done.exists():
        log.info("seed %d already finished (%s)", seed, done)
        return json.loads(done.read_text())
    seed_dir.mkdir(parents=True, exist_ok=True)
    set_seed(seed)
    log.info("seed %d", seed)
    encoder_path = seed_dir / "av_encoder.safetensors"
    if distributed.from_main(cfg.pretrain.enabled and not encoder_path.exists()):
        if distributed.is_main():  # stage 1 trains the small AV encoder in one process; the others wait
            pretrain_av(
                cfg, session.loader("train", cfg.pretrain.batch_size, True, seed, shard=False),
                session.loader("valid", cfg.train.eval_batch_size, False, shard=False), encoder_path, session.device,
            )
        distributed.barrier()
    model = session.new_model(seed)
    if cfg.pretrain.enabled:
        load_av_encoder(model, encoder_path)
    if distributed.rank() > 0:  # each rank draws its own dropout/augmentation noise
        set_seed(seed + distributed.rank())
    train_loader = session.loader("train", cfg.optim.batch_size, True, seed)
    loaders = {"train": train_loader, "valid": session.loader("valid", cfg.train.eval_batch_size, False)}
    engine = build_engine(model, cfg, len(train_loader), seed_dir)
    net = engine.wrap(model)
    state = fit(net, engine, loaders, cfg, seed_dir, session.device)
    eval_bf16 = eval_in_bf16(cfg)
    test = evaluate(net, session.loader("test", cfg.train.eval_batch_size, False), cfg.data.dataset,
                    session.device, eval_bf16, desc="test")
    log.info("seed %d test: %s", seed, format_metrics({k: test[k] for k in METRIC_KEYS[cfg.data.dataset]}))
    result = {
        "test": test,
        "valid": state.history[state.best_epoch]["valid"] if state.history else {},
        "best_epoch": state.best_epoch + 1,
        "epochs": state.epoch,
    }
    if distributed.is_main():
        write_json(done, result)
    distributed.barrier()
    return result


def aggregate(per_seed: dict, cfg: RunConfig) -> dict:
    """results.json content: test metric means at the top level under their MMSA names,
    their std across seeds, and the per-seed details."""
    keys = list(per_seed[next(iter(per_seed))]["test"])
    table = {k: np.array([r["test"][k] for r in per_seed.values()], dtype=np.float64) for k in keys}
    results = {k: float(v.mean()) for k, v in table.items()}
    results.update(
        std={k: float(v.std()) for k, v in table.items()},
        seeds=[int(s) for s in per_seed],
        per_seed=per_seed,
        dataset=cfg.data.dataset,
        backbone=cfg.model.backbone,
        metric_names=list(METRIC_KEYS[cfg.data.dataset]),
    )
    return results


def _check_run_dir(run_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs (writes nothing): a non-empty directory continues only the same
    configuration (finished seeds are kept, an interrupted one resumes); `resume` also accepts
    changed training settings as long as the model is the same; `overwrite` starts over."""
    if overwrite or not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not (run_dir / "config.json").exists():
        raise CheckpointError(
            f"output directory {str(run_dir)!r} is not empty and holds no run; choose another --output-dir "
            f"or pass --overwrite"
        )
    saved = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    same_model = dataclasses.replace(saved.model, av=cfg.model.av) == dataclasses.replace(cfg.model, av=cfg.model.av)
    if not same_model or (not resume and _comparable(saved) != _comparable(cfg)):
        raise ConfigError(
            f"output directory {str(run_dir)!r} holds a run with a different configuration; pass --overwrite "
            f"to start over, another --output-dir, or --resume to continue it with changed training settings"
        )
    log.info("continuing the run in %s", run_dir)


def _comparable(cfg: RunConfig) -> dict:
    """The configuration without fields that data loading fills in or that don't change results."""
    d = cfg.to_dict()
    d["model"]["av"].pop("audio_dim")
    d["model"]["av"].pop("vision_dim")
    d["train"].pop("device")
    return d


def load_run(run_dir: str | Path, device: torch.device, seed: int | None = None, data_path: str | None = None):
    """Rebuild a finished run's model (best weights of `seed`, default the first) and its
    data session for `deepmlf eval` / `predict`. -> (session, model)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{str(run_dir)!r} is not a run directory: config.json is missing")
    cfg = RunConfig.from_dict(json.loads(cfg_path.read_text()))
    if data_path is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=data_path))
    seed = cfg.train.seeds[0] if seed is None else seed
    weights = run_dir / f"seed_{seed}" / "best.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{str(weights)!r} does not exist: seed {seed} of this run has no trained model")
    dataset_spec(cfg.data.dataset)
    data = load_run_data(cfg)
    check_data_matches_model(cfg, data)
    session = Session(cfg, device, data)
    model = session.new_model(seed)
    model.load_trained_state_dict(load_weights(weights))
    return session, model
