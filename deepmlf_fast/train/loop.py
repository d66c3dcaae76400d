"""The training loop of both curriculum stages, with early stopping on a validation key metric.

`fit` trains a `Stage`: stage 1 (`stage1.AVPretrainStage`, the AV encoder on its L1 loss) or
stage 2 (`DeepMLFStage`, DeepMLF on its composite loss). Every epoch ends with a validation pass,
a best-checkpoint write when the key metric improved (by more than 1e-6, like the official
trainer), and a resume point, so an interrupted run continues from its last completed epoch (the
epoch in progress is redone). Training stops after `early_stop` epochs without improvement or at
`max_epochs`, then the best weights are reloaded.

The history of every epoch (loss terms, validation metrics, learning rate, stage 2's gate values
of every MM block, wall time) is kept in the resume point's state and handed to an optional
`Recorder` (TensorBoard), which also sees the running loss every `log_every` steps. `OnBatch`
callbacks see every micro-batch once its update is done.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from deepmlf_fast.config import RunConfig
from deepmlf_fast.ops.gate import gate_value
from deepmlf_fast.train import distributed
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
from deepmlf_fast.train.engine import Engine
from deepmlf_fast.train.evaluate import evaluate
from deepmlf_fast.train.rundir import StageFiles
from deepmlf_fast.train.step import StepContext, forward_step

log = logging.getLogger(__name__)


class Recorder(Protocol):
    """Receives training progress (rank 0 only)."""

    def step(self, step: int, losses: dict[str, float], lr: float, seconds_per_step: float,
             samples_per_s: float) -> None:
        """Every `log_every` micro-batches: running means of the loss terms since the last call."""

    def epoch(self, entry: dict) -> None:
        """After every epoch: its history entry (see `fit`)."""


class OnBatch(Protocol):
    """Called after every training micro-batch of either stage (its backward and, when due, the
    optimiser step are done), in every process that trains; progress display or fault injection."""

    def __call__(self, stage: int, epoch: int, batch: int) -> None:
        """`stage` 1 or 2; `epoch` and `batch` counted from 1 (`batch` within the epoch)."""


class Stage(Protocol):
    """What `fit` trains: a model, its engine and training data, and how the stage validates
    and checkpoints (the two implementations: `DeepMLFStage`, `stage1.AVPretrainStage`)."""

    number: int
    """1 (AV encoder) or 2 (DeepMLF), in logs and `OnBatch` calls."""
    shared: bool
    """Every rank of a distributed run trains the stage (stage 2); else rank 0 trains it alone."""
    model: torch.nn.Module
    """What forward passes run through (`engine.wrap(...)`)."""
    engine: Engine
    loader: torch.utils.data.DataLoader
    """Training batches (`data.make_loader`)."""
    ctx: StepContext
    """How training batches are run."""
    key: str
    """The validation metric early stopping minimises."""
    max_epochs: int
    early_stop: int
    log_every: int

    def validate(self) -> dict[str, float]:
        """Validation metrics, `key` among them (a stage's LR schedule may step on them)."""

    def weights(self) -> dict[str, torch.Tensor]:
        """The trained weights: what the resume point and the best checkpoint hold."""

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Put `weights()`'s output back."""

    def state_dict(self) -> dict:
        """The optimisation state (engine, schedulers) the resume point holds."""

    def load_state_dict(self, state: dict) -> None:
        """Put `state_dict()`'s output back."""

    def summary(self, weights: dict[str, torch.Tensor]) -> dict:
        """Entries an epoch's history adds from the epoch's final `weights` ({} when none)."""


@dataclass
class DeepMLFStage:
    """Stage 2: DeepMLF (`model` is `engine.wrap(model)`) on its composite loss, validated on the
    MMSA metrics, with early stopping on `cfg.optim.key_metric`."""

    number: ClassVar[int] = 2
    shared: ClassVar[bool] = True
    model: torch.nn.Module
    engine: Engine
    loader: torch.utils.data.DataLoader
    valid_loader: torch.utils.data.DataLoader
    cfg: RunConfig
    ctx: StepContext
    eval_ctx: StepContext
    key: str = field(init=False)
    max_epochs: int = field(init=False)
    early_stop: int = field(init=False)
    log_every: int = field(init=False)

    def __post_init__(self):
        self.key, self.max_epochs, self.early_stop = (self.cfg.optim.key_metric, self.cfg.optim.max_epochs,
                                                      self.cfg.optim.early_stop)
        self.log_every = self.cfg.train.log_every

    def validate(self) -> dict[str, float]:
        return evaluate(self.model, self.valid_loader, self.cfg.data.dataset, self.eval_ctx, desc="valid")

    def weights(self) -> dict[str, torch.Tensor]:
        return self.engine.model_state(self.model)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.engine.load_model_state(self.model, weights)

    def state_dict(self) -> dict:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state)

    def summary(self, weights: dict[str, torch.Tensor]) -> dict:
        """`gates`: `{block: {"attn": g, "ffn": g}}`."""
        return {"gates": gate_values(weights, self.cfg.model.fusion.gate)}


def gate_values(state: dict[str, torch.Tensor], gate: str) -> dict[str, dict[str, float]]:
    """The attention and FFN gate values of every MM block, read from a trained state dict."""
    out: dict[str, dict[str, float]] = {}
    for key, alpha in state.items():
        if key.startswith("mm_blocks.") and key.endswith(".gate.alpha"):
            _, block, half = key.split(".")[:3]
            out.setdefault(block, {})["attn" if half == "xattn" else "ffn"] = gate_value(alpha.float(), gate).mean().item()
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def train_epoch(model, engine, loader, ctx: StepContext, epoch: int, log_every: int, *, stage: int = 2,
                recorder: Recorder | None = None, on_batch: Sequence[OnBatch] = ()) -> dict[str, float]:
    """One pass over the training loader (`epoch` counted from 0) of stage `stage`; -> mean of
    each loss part and of the loss (`total`)."""
    model.train()
    loader.sampler.set_epoch(epoch)
    sums: dict[str, torch.Tensor] = {}
    logged: dict[str, float] = {}  # the sums at the previous log line
    n, samples, tick = 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"stage {stage} epoch {epoch + 1}", leave=False, dynamic_ncols=True)
    for batch in bar:
        step = forward_step(model, batch, ctx)
        engine.backward(step.loss, step.parts)
        engine.maybe_step()
        parts = dict(step.parts, total=step.loss.detach())
        for k, v in parts.items():
            sums[k] = sums.get(k, 0) + v
        n += 1
        samples += len(batch)
        for callback in on_batch:
            callback(stage, epoch + 1, n)
        if n % log_every == 0:  # the only reads of device values inside an epoch
            seconds = time.perf_counter() - tick
            now = {k: float(v) for k, v in sums.items()}
            losses = {k: (v - logged.get(k, 0.0)) / log_every for k, v in now.items()}
            logged = now
            bar.set_postfix(loss=f"{now['total'] / n:.4f}", lr=f"{engine.lr:.2e}")
            if recorder is not None:
                recorder.step(epoch * len(loader) + n, losses, engine.lr, seconds / log_every, samples / seconds)
            samples, tick = 0, time.perf_counter()
    engine.end_epoch()
    return {k: float(v) / max(n, 1) for k, v in sums.items()}


def fit(stage: Stage, files: StageFiles, recorder: Recorder | None = None,
        on_batch: Sequence[OnBatch] = ()) -> TrainState:
    """Train `stage` until early stopping; leaves the best weights loaded. Resumes from
    `files.last` when it exists. A shared stage (stage 2) is run by every rank of a distributed
    run: train losses are averaged over ranks and only rank 0 writes.

    History entry of an epoch: `epoch`, `train` (mean of each loss term), `valid` (metrics),
    `lr`, the stage's `summary` (stage 2: `gates`), `seconds`."""
    key = stage.key
    state = _resume(stage, files)
    holds_best = False  # the weights in memory are those the best checkpoint was just written from
    while state.epoch < stage.max_epochs and not _stopped(state, stage.early_stop):
        start = time.time()
        train = train_epoch(stage.model, stage.engine, stage.loader, stage.ctx, state.epoch, stage.log_every,
                            stage=stage.number, recorder=recorder, on_batch=on_batch)
        if stage.shared:
            train = distributed.average_values(train)
        valid = stage.validate()
        value = valid[key]
        improved = is_new_best(value, state.best_metric, state.best_epoch >= 0)
        if not math.isfinite(value):
            log.warning("stage %d epoch %d: valid %s is %s, which never counts as an improvement%s", stage.number,
                        state.epoch + 1, key, value, "; its weights are kept as the best only until an epoch has a "
                        "finite value" if improved else f"; the best stays epoch {state.best_epoch + 1}")
        # Read once: the best checkpoint and the resume point hold the same weights (under
        # DeepSpeed the read is a copy to the host, under ZeRO-3 a gather of every partition).
        engine_state, weights = stage.state_dict(), stage.weights()
        holds_best = improved
        if improved:
            state.best_metric, state.best_epoch = value if math.isfinite(value) else float("inf"), state.epoch
            if distributed.is_main():
                save_weights(weights, files.best)
        entry = {"epoch": state.epoch + 1, "train": train, "valid": valid, "lr": stage.engine.lr,
                 **stage.summary(weights), "seconds": round(time.time() - start, 2)}
        state.history.append(entry)
        state.epoch += 1
        if distributed.is_main():
            save_resume(files.last, weights, engine_state, state)
            if recorder is not None:
                recorder.epoch(entry)
        shown = "".join(f" {k} {valid[k]:.4f}" for k in dict.fromkeys((key, "MAE", "Corr")) if k in valid)
        log.info(
            "stage %d | epoch %d | train loss %.4f | valid%s%s | lr %.2e | %.0fs",
            stage.number, state.epoch, train["total"], shown, " *" if improved else "", stage.engine.lr,
            time.time() - start,
        )
    if stage.shared:
        distributed.barrier()  # rank 0 has written the best weights
    # Reading the file back holds a second copy of every trained weight (at 7B, 1.6 GB: the run's
    # memory peak); when the last epoch was the best, memory already holds those values. Every
    # rank of a distributed run reads, so that none waits in a collective another skipped.
    if not holds_best or distributed.is_distributed():
        stage.load_weights(load_weights(files.best))
    if math.isfinite(state.best_metric):
        log.info("stage %d: best %s %.4f at epoch %d", stage.number, key, state.best_metric, state.best_epoch + 1)
    else:
        log.warning("stage %d: no epoch had a finite valid %s: the weights kept are epoch %d's", stage.number, key,
                    state.best_epoch + 1)
    return state


def _resume(stage: Stage, files: StageFiles) -> TrainState:
    """Where `stage` starts: its resume point restored (weights, RNG, optimisation state) when
    there is one, else a fresh state."""
    last = files.last
    found = open_resume_point(last) if distributed.is_main() else None
    exists, repaired = distributed.from_main(found) if stage.shared else found
    if repaired:
        log.warning("stage %d resume point %s: %s", stage.number, last, repaired)
    if not exists:
        return TrainState()
    weights, engine_state, rng, state = load_resume(last)
    stage.load_weights(weights)
    set_rng_state(rng)
    stage.load_state_dict(engine_state)  # after the RNG: a DeepSpeed rank restores its own
    log.info("resuming stage %d from %s after epoch %d (best %s %.4f at epoch %d); the epoch in progress when the "
             "run stopped is redone", stage.number, last, state.epoch, stage.key, state.best_metric,
             state.best_epoch + 1)
    return state


def _stopped(state: TrainState, patience: int) -> bool:
    """Official rule: stop once the last finished epoch is `patience` epochs past the best."""
    return state.epoch > 0 and (state.epoch - 1) - state.best_epoch >= patience
