"""The run directory: its layout, and the policy that keeps runs from mixing.

    DIR/config.json                      the RunConfig, with what the hardware decided (`resolved`)
    DIR/results.json                     test metrics (mean over seeds) and per-seed details
    DIR/timing.json                      wall time of the last invocation (kept out of results.json,
                                         which the same command reproduces byte for byte)
    DIR/train.log
    DIR/seed_<s>/stage1/                 stage 1 in progress: resume point (last/) and best weights
                                         (best.safetensors)
    DIR/seed_<s>/av_encoder.safetensors  stage-1 AV encoder, written when stage 1 is complete
    DIR/seed_<s>/best.safetensors        best stage-2 weights (only what DeepMLF trains)
    DIR/seed_<s>/last/                   resume point: model.safetensors, optimizer.pt, state.json
    DIR/seed_<s>/deepspeed/              DeepSpeed checkpoints the resume point names
    DIR/seed_<s>/result.json             this seed's test/valid metrics
    DIR/tb/seed_<s>/                     TensorBoard event files (with the optional `tensorboard`)

A directory holding a run continues only that run's configuration: finished seeds are
kept and an interrupted one resumes. `--resume` also accepts changed training settings as
long as the model is the same; `--overwrite` starts over.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from deepmlf_fast.config import RunConfig
from deepmlf_fast.errors import CheckpointError, ConfigError
from deepmlf_fast.fileio import read_json
from deepmlf_fast.train.checkpoint import read_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageFiles:
    """Where a training stage keeps its progress (`train.loop.fit`)."""

    last: Path
    """The resume point, a folder (`checkpoint.save_resume`)."""
    best: Path
    """The best weights so far (safetensors)."""


class RunDir:
    """Paths inside one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def timing(self) -> Path:
        return self.root / "timing.json"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    def seed(self, seed: int) -> Path:
        return self.root / f"seed_{seed}"

    def av_encoder(self, seed: int) -> Path:
        return self.seed(seed) / "av_encoder.safetensors"

    def stage1(self, seed: int) -> StageFiles:
        """Stage 1's resume point and best weights (the AV pretraining model's)."""
        folder = self.seed(seed) / "stage1"
        return StageFiles(folder / "last", folder / "best.safetensors")

    def stage2(self, seed: int) -> StageFiles:
        """Stage 2's resume point and best weights (what DeepMLF trains)."""
        return StageFiles(self.last(seed), self.best(seed))

    def best(self, seed: int) -> Path:
        return self.seed(seed) / "best.safetensors"

    def last(self, seed: int) -> Path:
        return self.seed(seed) / "last"

    def result(self, seed: int) -> Path:
        return self.seed(seed) / "result.json"

    def deepspeed(self, seed: int) -> Path:
        return self.seed(seed) / "deepspeed"

    def tensorboard(self, seed: int) -> Path:
        return self.root / "tb" / f"seed_{seed}"

    def read_history(self, seed: int) -> list[dict]:
        """Stage 2's per-epoch history of `seed` (`train.loop.fit`), or [] when the seed left
        no resume point; CheckpointError naming a damaged one."""
        return read_state(self.last(seed)).history if self.last(seed).is_dir() else []

    def read_config(self) -> RunConfig:
        """The saved configuration of a run (CheckpointError when there is none)."""
        if not self.config.is_file():
            raise CheckpointError(f"{str(self.root)!r} is not a run directory: config.json is missing")
        raw = read_json(self.config, "run configuration", CheckpointError)
        try:
            return RunConfig.from_dict(raw)
        except ConfigError as e:
            raise CheckpointError(f"run configuration {str(self.config)!r} is damaged: {e}") from None

    def check_compatible(self, cfg: RunConfig, resume: bool, overwrite: bool) -> None:
        """Refuse to mix runs (writes nothing): a non-empty directory continues only the same
        configuration; `resume` also accepts changed training settings when the model is the
        same; `overwrite` starts over."""
        if overwrite or not self.root.exists() or not any(self.root.iterdir()):
            return
        if not self.config.exists():
            raise CheckpointError(
                f"output directory {str(self.root)!r} is not empty and holds no run; choose another --output-dir "
                f"or pass --overwrite"
            )
        saved = self.read_config()
        same_model = _model_fields(saved) == _model_fields(cfg)
        if not same_model or (not resume and _comparable(saved) != _comparable(cfg)):
            raise ConfigError(
                f"output directory {str(self.root)!r} holds a run with a different configuration; pass --overwrite "
                f"to start over, another --output-dir, or --resume to continue it with changed training settings"
            )
        log.info("continuing the run in %s", self.root)

    def create(self, overwrite: bool) -> None:
        """Make the directory (emptied first with `overwrite`)."""
        if overwrite and self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)


def _model_fields(cfg: RunConfig) -> dict:
    """The model configuration, with the AV input widths data loading fills in left out."""
    d = dataclasses.asdict(cfg.model)
    d["av"].pop("audio_dim")
    d["av"].pop("vision_dim")
    return d


def _comparable(cfg: RunConfig) -> dict:
    """The configuration without fields that data loading or the hardware fill in, or that
    don't change results."""
    d = cfg.to_dict()
    d["model"]["av"].pop("audio_dim")
    d["model"]["av"].pop("vision_dim")
    d["train"].pop("device")
    d.pop("resolved")
    return d
