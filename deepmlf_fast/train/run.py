"""A whole run: data, both curriculum stages for every seed, test metrics, results.json.

    resolve the hardware (precision, backend) -> validate every input -> load + validate data
    -> tokenize each split once -> load the frozen backbone once
    for each seed: stage 1 (AV encoder) -> stage 2 (DeepMLF, early stopping) -> test
    -> DIR/results.json (test metrics averaged over seeds, with std and per-seed details)

Each seed's stage-2 progress also goes to TensorBoard (`DIR/tb/seed_<s>/`) when the optional
`tensorboard` package is installed (`train/tensorboard.py`).

A run directory can be resumed: finished seeds are skipped, an interrupted seed restarts
from its last completed epoch (`train/rundir.py` has the layout and the policy).

With `train.deepspeed` set, every rank of the launch runs `train_run`: each trains on its
shard through a `DeepSpeedEngine`, and only rank 0 writes (see `train/distributed.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from deepmlf_fast.backbones.load import LoadedBackbone, backbone_config, load_backbone
from deepmlf_fast.backbones.quantize import WHOLE_WEIGHT_COPIES
from deepmlf_fast.config import RunConfig, validate_config, with_av_widths
from deepmlf_fast.data import MMSAData, load_mmsa, make_loader, make_synthetic, tokenize_texts
from deepmlf_fast.data.mmsa import MMSASplit, check_data_file
from deepmlf_fast.data.specs import dataset_spec
from deepmlf_fast.errors import CheckpointError, ConfigError
from deepmlf_fast.fileio import cache_dir, check_output, read_json, write_json
from deepmlf_fast.hardware import DTYPES, resolve_device, resolve_run
from deepmlf_fast.host import keep_freed_memory
from deepmlf_fast.metrics import format_metrics, metric_keys
from deepmlf_fast.model.build import build_deepmlf
from deepmlf_fast.model.deepmlf import DeepMLF, check_model_config
from deepmlf_fast.model.losses import deepmlf_loss
from deepmlf_fast.train import distributed
from deepmlf_fast.train.checkpoint import load_weights
from deepmlf_fast.train.engine import make_engine
from deepmlf_fast.train.evaluate import predict, predict_split, split_metrics
from deepmlf_fast.train.loop import DeepMLFStage, OnBatch, fit
from deepmlf_fast.train.rundir import RunDir
from deepmlf_fast.train.stage1 import pretrain_av
from deepmlf_fast.train.step import StepContext
from deepmlf_fast.train.tensorboard import tensorboard_recorder

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")


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


def load_run_data(cfg: RunConfig, require_labels: bool = True) -> MMSAData:
    """Load and validate the run's data (the embedded synthetic default when no path);
    `require_labels=False` also reads new, unlabeled samples (`data.mmsa`)."""
    path = cfg.data.path or demo_data_path(cfg)
    return load_mmsa(path, cfg.data.dataset, cfg.data.audio_dim, cfg.data.vision_dim, require_labels)


class Session:
    """Everything loaded once per run and shared by its seeds: the hardware decisions, data,
    tokens, backbone, and how batches are run (`train_ctx`, `eval_ctx`).

    With `model` (an already built DeepMLF, e.g. `apply_deepmlf`'s) and its `tokenizer`, the
    session trains that model: its backbone and configuration replace `cfg.model`'s (see
    `with_model`), and the data must have the feature widths its AV encoder was built for.
    `on_batch`: callbacks every training micro-batch of both stages reaches (`loop.OnBatch`).
    `test_predictions[seed]`: the test split's `predict_split` arrays of each seed trained in
    this session (its best weights), which the closing report draws instead of predicting again.
    `trained_models[seed]`: the model of a one-seed, one-process run without DeepSpeed as
    training left it (its best weights, gradients dropped), which `load_run` takes over instead
    of building a second one (at 7B, 1.6 GB of MM blocks and the best weights read beside them:
    the run's peak)."""

    def __init__(self, cfg: RunConfig, device: torch.device, data: MMSAData | None = None,
                 model: DeepMLF | None = None, tokenizer=None, on_batch: Sequence[OnBatch] = ()):
        self.device = device
        self.model = model
        self.on_batch = tuple(on_batch)
        self.test_predictions: dict[int, dict[str, np.ndarray]] = {}
        self.trained_models: dict[int, DeepMLF] = {}
        cfg = dataclasses.replace(cfg, resolved=resolve_run(cfg, device))
        self.data = data if data is not None else load_run_data(cfg)
        # A file of unlabelled samples stands in for every split: count and tokenise it once.
        distinct: dict[int, tuple[str, MMSASplit]] = {}
        for name in SPLITS:
            distinct.setdefault(id(self.data.split(name)), (name, self.data.split(name)))
        zeroed = sum(s.zeroed_neg_inf for _, s in distinct.values())
        if zeroed:
            log.info("%s: %d -inf feature values replaced by 0, as MMSA's loaders do", self.data.source, zeroed)
        # The AV widths are the data's; a saved or given model's must equal them.
        cfg = with_av_widths(cfg, self.data.feature_dims)
        if model is None:
            self.cfg = cfg
            r, m = self.cfg.resolved, self.cfg.model
            self.backbone = load_backbone(m.backbone, dtype=DTYPES[r.precision], quant=m.quant,
                                          random_init=m.random_init, device=device)
        else:
            found = model.fusion_tokens.weight.device
            if found.type != device.type:
                raise ConfigError(f"train.device: the given model is on {found}, expected the run's device {device}")
            self.cfg = cfg
            r, m = cfg.resolved, cfg.model
            self.backbone = LoadedBackbone(model.lm, tokenizer, model.spec, model.pad_id, m.backbone)
        if device.type == "cpu" and m.quant in WHOLE_WEIGHT_COPIES:
            log.info("--quant %s on CPU: freed memory goes back to the kernel (faster steps would cost several GiB "
                     "of heap fragmentation at 7B; --quant int8-dynamic and int8-weight-only have both)", m.quant)
        elif device.type == "cpu":
            # Only now: while a backbone is built layer by layer, freed dense layers must go back
            # to the kernel (glibc's default for large blocks), or the build's peak grows with them.
            keep_freed_memory()
        tok = self.backbone.tokenizer
        tokens = {key: tokenize_texts(s.raw_text, tok, m.text.max_tokens, name, self.backbone.pad_id)
                  for key, (name, s) in distinct.items()}
        self.tokens = {name: tokens[id(self.data.split(name))] for name in SPLITS}
        self.train_ctx = StepContext(device, r.precision == "bf16", lambda out, y: deepmlf_loss(out, y, m.loss))
        self.eval_ctx = dataclasses.replace(self.train_ctx, bf16=r.eval_precision == "bf16")

    def loader(self, split: str, batch_size: int, shuffle: bool, seed: int | None = None, shard: bool = True):
        """A packed loader over `split`; in a distributed run each rank reads its shard unless `shard=False`."""
        m = self.cfg.model
        return make_loader(
            self.data.split(split), self.tokens[split], m.fusion.n_tokens, m.text.max_tokens, batch_size, shuffle,
            seed=seed, num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
            rank=distributed.rank() if shard else 0, world_size=distributed.world_size() if shard else 1,
        )

    def new_model(self, seed: int) -> DeepMLF:
        """The model seed `seed` trains: built around the backbone, or the session's given model."""
        if self.model is not None:
            self.model.set_backend(self.cfg.resolved.attention_backend)
            return self.model
        model, _ = build_deepmlf(self.cfg.model, init_seed=seed, backbone=self.backbone,
                                 backend=self.cfg.resolved.attention_backend)
        return model


def with_model(cfg: RunConfig, model: DeepMLF, tokenizer) -> RunConfig:
    """`cfg` for training an already built DeepMLF: its model section becomes the model's own
    configuration (what config.json records). ConfigError unless a tokenizer is given and the
    run has one seed (the model is initialised once)."""
    if tokenizer is None:
        raise ConfigError("train_run(model=...): expected the backbone's tokenizer (tokenizer=...), found None")
    if len(cfg.train.seeds) != 1:
        raise ConfigError(f"train.seeds: a run of a given model trains that one model, expected one seed, "
                          f"found {list(cfg.train.seeds)}")
    return dataclasses.replace(cfg, model=model.cfg)


def check_run(cfg: RunConfig, lm_config=None) -> None:
    """Validate what can be checked before anything is loaded or written: every configuration
    field, the model configuration against the backbone's dimensions (read from its config,
    never its weights, or `lm_config` when the backbone is already loaded), the data file's
    presence, and the output directory."""
    validate_config(cfg)
    check_model_config(cfg.model, lm_config if lm_config is not None else backbone_config(cfg.model.backbone))
    if cfg.data.path is not None:
        check_data_file(cfg.data.path)
    check_output(cfg.train.output_dir, "train.output_dir", ConfigError, directory=True)


def train_run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, model: DeepMLF | None = None,
              tokenizer=None, on_batch: Sequence[OnBatch] = ()) -> dict:
    """Run every seed of `cfg` into `cfg.train.output_dir`; -> the results dict also written
    to `results.json` (test metrics under their MMSA names, averaged over seeds). The same as
    `run_training`, without its session."""
    return run_training(cfg, resume=resume, overwrite=overwrite, model=model, tokenizer=tokenizer,
                        on_batch=on_batch)[0]


def run_training(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, model: DeepMLF | None = None,
                 tokenizer=None, on_batch: Sequence[OnBatch] = ()) -> tuple[dict, Session]:
    """Run every seed of `cfg` into `cfg.train.output_dir`; -> (the results dict also written
    to `results.json`: test metrics under their MMSA names, averaged over seeds; the `Session`
    that ran them, whose loaded backbone and data `load_run(..., session=)` reuses).

    `model`, with its backbone's `tokenizer`: train this already built DeepMLF (the one
    `apply_deepmlf` returned, for instance) instead of building one from `cfg.model`; its own
    configuration replaces `cfg.model`, the run has one seed, and under DeepSpeed every rank
    passes its own copy. Everything else (stage 1, the loop, the engines, checkpoints, resume)
    is the same code path as `deepmlf train`.

    `on_batch`: callables `(stage, epoch, batch)` run after every training micro-batch of both
    stages (`loop.OnBatch`), e.g. a progress display.

    Inputs (run directory, configuration, data, backbone) are all validated before anything
    is written, so a bad argument leaves no half-made run directory behind."""
    if model is not None:
        cfg = with_model(cfg, model, tokenizer)
    check_run(cfg, None if model is None else model.lm.config)
    run_dir = RunDir(cfg.train.output_dir)
    run_dir.check_compatible(cfg, resume, overwrite)
    if cfg.train.deepspeed:  # every rank runs this function; only rank 0 writes files
        from deepmlf_fast.train.deepspeed_config import deepspeed_config_for

        distributed.init_process_group()
        device = distributed.local_device(cfg.train.device)
        deepspeed_config_for(dataclasses.replace(cfg, resolved=resolve_run(cfg, device)), distributed.world_size())
    else:
        device = resolve_device(cfg.train.device)
    start = time.time()
    with distributed.rank_zero_first():  # rank 0 fills shared caches (tiny backbones, synthetic data)
        session = Session(cfg, device, model=model, tokenizer=tokenizer, on_batch=on_batch)
    if distributed.is_main():
        run_dir.create(overwrite)
    distributed.barrier()
    if not distributed.is_main():
        return _train_seeds(session, run_dir), session
    file_log = logging.FileHandler(run_dir.log)
    file_log.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logging.getLogger("deepmlf_fast").addHandler(file_log)
    try:
        results = _train_seeds(session, run_dir)
    finally:
        logging.getLogger("deepmlf_fast").removeHandler(file_log)
        file_log.close()
    write_json(run_dir.results, results)  # deterministic: the same command gives the same bytes
    write_json(run_dir.timing, {"seconds": round(time.time() - start, 1)})
    log.info("run finished in %.0f s -> %s", time.time() - start, run_dir.results)
    return results, session


def _train_seeds(session: Session, run_dir: RunDir) -> dict:
    cfg = session.cfg
    if distributed.is_main():
        write_json(run_dir.config, cfg.to_dict())
    log.info("data %s: %d/%d/%d samples, audio %s, vision %s | backbone %s | device %s",
             session.data.source, len(session.data.train), len(session.data.valid), len(session.data.test),
             session.data.train.audio.shape[1:], session.data.train.vision.shape[1:], cfg.model.backbone,
             session.device)
    per_seed = {str(seed): _run_seed(session, seed, run_dir) for seed in cfg.train.seeds}
    results = aggregate(per_seed, cfg)
    log.info("test (mean over %d seed%s): %s", len(per_seed), "s" * (len(per_seed) > 1),
             format_metrics({k: results[k] for k in metric_keys(cfg.data.dataset)}))
    return results


def _run_seed(session: Session, seed: int, run_dir: RunDir) -> dict:
    cfg = session.cfg
    done = run_dir.result(seed)
    if done.exists():
        log.info("seed %d already finished (%s)", seed, done)
        return read_json(done, "seed result", CheckpointError)
    run_dir.seed(seed).mkdir(parents=True, exist_ok=True)
    set_seed(seed)
    log.info("seed %d", seed)
    encoder_path = run_dir.av_encoder(seed)
    if distributed.from_main(cfg.pretrain.enabled and not encoder_path.exists()):
        if distributed.is_main():  # stage 1 trains the small AV encoder in one process; the others wait
            pretrain_av(
                cfg, session.loader("train", cfg.pretrain.batch_size, True, seed, shard=False),
                session.loader("valid", cfg.train.eval_batch_size, False, shard=False), run_dir.stage1(seed),
                encoder_path, session.device, session.train_ctx.bf16, session.on_batch,
            )
        distributed.barrier()
    model = session.new_model(seed)
    if cfg.pretrain.enabled:
        model.load_av_encoder(load_weights(encoder_path))
    # Stage 2's random stream starts from the seed whether or not stage 1 ran in this process,
    # so a run resumed after stage 1 draws exactly what an uninterrupted one draws.
    set_seed(seed + distributed.rank())  # each rank draws its own dropout/augmentation noise
    train_loader = session.loader("train", cfg.optim.batch_size, True, seed)
    valid_loader = session.loader("valid", cfg.train.eval_batch_size, False)
    engine = make_engine("deepmlf", model, cfg, len(train_loader), run_dir.deepspeed(seed))
    net = engine.wrap(model)
    # TensorBoard scalars under DIR/tb/seed_<s>/ when the optional package is installed (rank 0 writes)
    recorder = tensorboard_recorder(run_dir.tensorboard(seed)) if distributed.is_main() else None
    try:
        stage = DeepMLFStage(net, engine, train_loader, valid_loader, cfg, session.train_ctx, session.eval_ctx)
        state = fit(stage, run_dir.stage2(seed), recorder, session.on_batch)
    finally:
        if recorder is not None:
            recorder.close()
    predictions = predict_split(net, session.loader("test", cfg.train.eval_batch_size, False), session.eval_ctx,
                                desc="test")
    session.test_predictions[seed] = predictions
    # Kept only when no other seed trains after it in this session (it would hold its memory
    # through their training) and no engine reshaped its parameters.
    if list(cfg.train.seeds) == [seed] and not cfg.train.deepspeed and not distributed.is_distributed():
        model.zero_grad(set_to_none=True)
        session.trained_models[seed] = model
    test = split_metrics(predictions, cfg.data.dataset)
    log.info("seed %d test: %s", seed, format_metrics({k: test[k] for k in metric_keys(cfg.data.dataset)}))
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
        metric_names=list(metric_keys(cfg.data.dataset)),
    )
    return results


def load_run(run_dir: str | Path, device: torch.device, seed: int | None = None, data_path: str | None = None,
             require_labels: bool = True, session: Session | None = None):
    """Rebuild (or take over) a finished run's model (best weights of `seed`, default the first) and its data
    session for `deepmlf eval` / `predict` / `report`. -> (session, model). `require_labels=False`
    (predict) also reads a data file of new samples without labels. `session`: the one that
    trained the run (`run_training`'s), whose backbone and data are reused instead of loaded
    again (a 7B backbone is not built twice), and whose kept trained model
    (`Session.trained_models`) is handed over instead of rebuilt, once; `device` and
    `data_path` are then its own."""
    rd = RunDir(run_dir)
    cfg = session.cfg if session is not None else rd.read_config()
    if session is None and data_path is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=data_path))
    seed = cfg.train.seeds[0] if seed is None else seed
    if not rd.best(seed).is_file():
        raise CheckpointError(f"{str(rd.best(seed))!r} does not exist: seed {seed} of this run has no trained model "
                              f"(its seeds: {list(cfg.train.seeds)})")
    if session is None:
        dataset_spec(cfg.data.dataset)
        session = Session(cfg, device, load_run_data(cfg, require_labels))
    model = session.trained_models.pop(seed, None)  # fit left its best weights loaded: the same as reading them
    if model is None:
        model = session.new_model(seed)
        model.load_trained_state_dict(load_weights(rd.best(seed)))
    return session, model


def av_swap_maes(run_dir: str | Path, seed: int, perm_seed: int = 0) -> dict[str, float]:
    """The fusion ablation of a finished run: test MAE of the task, fusion-token and text
    predictions of `seed`'s best model as trained (`own_pred`, `own_pred_fusion`,
    `own_pred_text`) and with every test sample's audio and vision replaced by another
    sample's, under one fixed permutation (`swapped_...`). A model that reads AV gets worse
    when swapped; the text head, which never sees AV, must not change."""
    session, model = load_run(run_dir, torch.device("cpu"), seed=seed)
    test = session.data.test
    own = predict(model, session.loader("test", 64, False), session.eval_ctx)
    perm = np.random.default_rng(perm_seed).permutation(len(test))
    test.audio, test.vision = test.audio[perm], test.vision[perm]
    if test.audio_lengths is not None:
        test.audio_lengths, test.vision_lengths = test.audio_lengths[perm], test.vision_lengths[perm]
    swapped = predict(model, session.loader("test", 64, False), session.eval_ctx)
    return {f"{which}_{head}": float(np.abs(p[head] - p["labels"]).mean())
            for which, p in (("own", own), ("swapped", swapped)) for head in ("pred", "pred_fusion", "pred_text")}
