"""Stage 2: train DeepMLF with early stopping on the validation key metric.

Every epoch ends with a validation pass, a best-checkpoint write when the key metric
improved (by more than 1e-6, like the official trainer), and a resume point, so an
interrupted run continues from its last completed epoch (the epoch in progress is redone).
Training stops after `early_stop` epochs without improvement or at `max_epochs`, then the
best weights are reloaded.

The history of every epoch (loss terms, validation metrics, learning rate, the gate values of
every MM block, wall time) is kept in the resume point's state and handed to an optional
`Recorder` (TensorBoard, reports), which also sees the running loss every `log_every` steps.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from deepmlf_fast.config import RunConfig
from deepmlf_fast.train import distributed
from deepmlf_fast.fileio import pause_point
from deepmlf_fast.ops.gate import gate_value
from deepmlf_fast.train.checkpoint import (
    TrainState,
    is_new_best,
    load_resume,
    load_weights,
    open_resume_point,
    save_resume,
    save_weights,
    set_rng_state,
)
from deepmlf_fast.train.evaluate import evaluate
from deepmlf_fast.train.step import StepContext, forward_step

log = logging.getLogger(__name__)


class Recorder(Protocol):
    """Receives training progress (rank 0 only)."""

    def step(self, step: int, losses: dict[str, float], lr: float, seconds_per_step: float,
             samples_per_s: float) -> None:
        """Every `log_every` micro-batches: running means of the loss terms since the last call."""

    def epoch(self, entry: dict) -> None:
        """After every epoch: its history entry (see `fit`)."""


def gate_values(state: dict[str, torch.Tensor], gate: str) -> dict[str, dict[str, float]]:
    """The attention and FFN gate values of every MM block, read from a trained state dict."""
    out: dict[str, dict[str, float]] = {}
    for key, alpha in state.items():
        if key.startswith("mm_blocks.") and key.endswith(".gate.alpha"):
            _, block, half = key.split(".")[:3]
            out.setdefault(block, {})["attn" if half == "xattn" else "ffn"] = gate_value(alpha.float(), gate).mean().item()
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def train_epoch(model, engine, loader, cfg: RunConfig, ctx: StepContext, epoch: int,
                recorder: Recorder | None = None) -> dict[str, float]:
    """One pass over the training loader; -> mean of each loss part."""
    model.train()
    loader.sampler.set_epoch(epoch)
    sums: dict[str, torch.Tensor] = {}
    logged: dict[str, float] = {}  # the sums at the previous log line
    n, samples, tick = 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True)
    for batch in bar:
        step = forward_step(model, batch, ctx)
        engine.backward(step.loss, step.parts)
        engine.maybe_step()
        pause_point(f"stage2-epoch{epoch + 1}-batch{n + 1}")
        parts = dict(step.parts, total=step.loss.detach())
        for k, v in parts.items():
            sums[k] = sums.get(k, 0) + v
        n += 1
        samples += len(batch)
        if n % cfg.train.log_every == 0:  # the only reads of device values inside an epoch
            seconds = time.perf_counter() - tick
            now = {k: float(v) for k, v in sums.items()}
            losses = {k: (v - logged.get(k, 0.0)) / cfg.train.log_every for k, v in now.items()}
            logged = now
            bar.set_postfix(loss=f"{now['total'] / n:.4f}", lr=f"{engine.lr:.2e}")
            if recorder is not None:
                recorder.step(epoch * len(loader) + n, losses, engine.lr, seconds / cfg.train.log_every,
                              samples / seconds)
            samples, tick = 0, time.perf_counter()
    engine.end_epoch()
    return {k: float(v) / max(n, 1) for k, v in sums.items()}


def fit(model, engine, loaders: dict, cfg: RunConfig, seed_dir: Path, train_ctx: StepContext,
        eval_ctx: StepContext, recorder: Recorder | None = None) -> TrainState:
    """Train until early stopping; leaves the best weights loaded. Resumes from
    `seed_dir/last` when it exists. In a distributed run every rank calls it (`model` is
    `engine.wrap(model)`); train losses are averaged over ranks and only rank 0 writes.

    History entry of an epoch: `epoch`, `train` (mean of each loss term), `valid` (metrics),
    `lr`, `gates` (`{block: {"attn": g, "ffn": g}}`), `seconds`."""
    key = cfg.optim.key_metric
    state = TrainState()
    last, best_path = seed_dir / "last", seed_dir / "best.safetensors"
    exists, repaired = distributed.from_main(open_resume_point(last) if distributed.is_main() else None)
    if repaired:
        log.warning("resume point %s: %s", last, repaired)
    if exists:
        model_state, engine_state, rng, state = load_resume(last)
        engine.load_model_state(model, model_state)
        set_rng_state(rng)
        engine.load_state_dict(engine_state)  # after the RNG: a DeepSpeed rank restores its own
        log.info("resuming stage 2 from %s after epoch %d (best %s %.4f at epoch %d); the epoch in progress "
                 "when the run stopped is redone", last, state.epoch, key, state.best_metric, state.best_epoch + 1)
    while state.epoch < cfg.optim.max_epochs and not _stopped(state, cfg.optim.early_stop):
        start = time.time()
        train = distributed.average_values(
            train_epoch(model, engine, loaders["train"], cfg, train_ctx, state.epoch, recorder))
        valid = evaluate(model, loaders["valid"], cfg.data.dataset, eval_ctx, desc="valid")
        value = valid[key]
        improved = is_new_best(value, state.best_metric, state.best_epoch >= 0)
        if not math.isfinite(value):
            log.warning("epoch %d: valid %s is %s, which never counts as an improvement%s", state.epoch + 1, key,
                        value, "; its weights are kept as the best only until an epoch has a finite value"
                        if improved else f"; the best stays epoch {state.best_epoch + 1}")
        # Read once: the best checkpoint and the resume point hold the same weights (under
        # DeepSpeed the read is a copy to the host, under ZeRO-3 a gather of every partition).
        engine_state, model_state = engine.state_dict(), engine.model_state(model)
        if improved:
            state.best_metric, state.best_epoch = value if math.isfinite(value) else float("inf"), state.epoch
            if distributed.is_main():
                save_weights(model_state, best_path)
        entry = {"epoch": state.epoch + 1, "train": train, "valid": valid, "lr": engine.lr,
                 "gates": gate_values(model_state, cfg.model.fusion.gate), "seconds": round(time.time() - start, 2)}
        state.history.append(entry)
        state.epoch += 1
        if distributed.is_main():
            save_resume(last, model_state, engine_state, state)
            if recorder is not None:
                recorder.epoch(entry)
        shown = "".join(f" {k} {valid[k]:.4f}" for k in dict.fromkeys((key, "MAE", "Corr")))
        log.info(
            "epoch %d | train loss %.4f | valid%s%s | lr %.2e | %.0fs",
            state.epoch, train["total"], shown, " *" if improved else "", engine.lr, time.time() - start,
        )
    distributed.barrier()  # rank 0 has written the best weights
    engine.load_model_state(model, load_weights(best_path))
    if math.isfinite(state.best_metric):
        log.info("best %s %.4f at epoch %d", key, state.best_metric, state.best_epoch + 1)
    else:
        log.warning("no epoch had a finite valid %s: the weights kept are epoch %d's", key, state.best_epoch + 1)
    return state


def _stopped(state: TrainState, patience: int) -> bool:
    """Official rule: stop once the last finished epoch is `patience` epochs past the best."""
    return state.epoch > 0 and (state.epoch - 1) - state.best_epoch >= patience
