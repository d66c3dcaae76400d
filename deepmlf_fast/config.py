"""Typed configuration for deepmlf-fast.

Every knob of a run lives in one of the dataclasses below; `RunConfig` groups them.
Named recipes that fill them in live in `deepmlf_fast.presets`, as flat tables of dotted
overrides (`"model.fusion.n_tokens": 12`) applied by `apply_overrides`; the CLI's flags and
`deepmlf sweep`'s grids use the same paths.

The `parity` field of `ModelConfig` selects between the corrected default and the
`official` mode that reproduces the released code's numerics. Every behaviour that
differs between the two is a field of `ParityFlags`, and nothing else may differ.

The field types are the one statement of what each field accepts: `validate_config` reads
them (a `Literal`'s values, a bound in `Annotated[..., Check(...)]`) and the CLI's `choices=`
come from `choices`. A set of choices that carries data or code lives with it and its
`Literal` is made from it: dataset names are the keys of `data.specs.DATASETS`, gate kinds
of `ops.gate.GATES`, attention backends `ops.dispatch.BACKENDS`, parity modes of
`PARITY_FLAGS`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Mapping

from deepmlf_fast.data.specs import DatasetName, dataset_spec
from deepmlf_fast.errors import ConfigError
from deepmlf_fast.ops.dispatch import BACKENDS
from deepmlf_fast.ops.gate import GATES

GateKind = Literal[GATES]
AttentionBackend = Literal[BACKENDS]
PrecisionName = Literal["fp32", "bf16"]
QuantName = Literal["none", "llm-int8", "nf4", "int8-weight-only", "fp8", "int8-dynamic"]
"""`--quant` methods for the frozen backbone's decoder linears (`backbones.quantize`)."""


@dataclass(frozen=True)
class Check:
    """A bound on a field's value beyond its type, read by `validate_config` from an
    `Annotated` type: `ok(value)` must hold; `expected` says what in error messages."""

    ok: Callable[[Any], bool]
    expected: str


PositiveInt = Annotated[int, Check(lambda v: v >= 1, "an integer >= 1")]
NonNegativeInt = Annotated[int, Check(lambda v: v >= 0, "an integer >= 0")]
Positive = Annotated[float, Check(lambda v: v > 0, "a number > 0")]
NonNegative = Annotated[float, Check(lambda v: v >= 0, "a number >= 0")]
Probability = Annotated[float, Check(lambda v: 0 <= v < 1, "a number in [0, 1)")]
Fraction = Annotated[float, Check(lambda v: 0 <= v <= 1, "a number in [0, 1]")]


@dataclass(frozen=True)
class ParityFlags:
    """The complete list of behaviours that differ between `corrected` and `official`.

    README section "Parity mode" renders this table; tests assert that the two modes
    differ in exactly these fields.
    """

    xattn_scale: Literal["head_dim", "model_dim"]
    """Cross-attention softmax scale: 1/sqrt(head_dim) or the official 1/sqrt(D)."""
    av_pooling: Literal["contiguous", "strided"]
    """Pooling of raw AV frames to L_av: contiguous windows, or official frames t, t+L_av, ..."""
    ffn_copy: Literal["weights_biases_lm_act", "weights_only_exact_gelu"]
    """MM FFN init: copy weights and biases and use the LM's activation, or official
    weights only (random biases) with exact-erf GELU for GPT-2."""
    llama_ffn: Literal["swiglu", "additive"]
    """Llama-family MM FFN: real SwiGLU down(act(gate) * up), or official down(act(gate) + up)."""
    grad_accum: Literal["mean", "sum_drop_tail"]
    """Gradient accumulation: average micro-batches and step on the tail, or official sum
    and discard the trailing partial accumulation of every epoch."""
    grad_clip: Literal["norm_all", "value_mm_only"]
    """Clipping: global L2 norm over all trained parameters, or official element-wise
    value clipping of the MM-side parameters only (stage 1: value clip per micro-batch)."""
    weight_decay: Literal["exempt_norms_gates_tokens_biases", "exempt_biases_only"]
    """Weight-decay groups: exempt biases, norms, gates, fusion tokens and BatchNorm, or
    official (only biases exempt; stage 1 uses AdamW's default 0.01)."""
    eval_precision: Literal["train", "bf16"]
    """Evaluation precision: same as training, or official bf16 autocast at evaluation (where the
    device runs bf16 natively; elsewhere fp32, see `deepmlf_fast.hardware.eval_precision`)."""
    mm_norm_eps: Literal["lm", "official"]
    """Epsilon of the MM blocks' norms: the wrapped LM's own (its other norms normalise the same
    residual stream), or the official constants (1e-5 LayerNorm, 1e-6 RMSNorm; SmolLM2 uses 1e-5)."""


PARITY_FLAGS: dict[str, ParityFlags] = {
    "corrected": ParityFlags(
        xattn_scale="head_dim",
        av_pooling="contiguous",
        ffn_copy="weights_biases_lm_act",
        llama_ffn="swiglu",
        grad_accum="mean",
        grad_clip="norm_all",
        weight_decay="exempt_norms_gates_tokens_biases",
        eval_precision="train",
        mm_norm_eps="lm",
    ),
    "official": ParityFlags(
        xattn_scale="model_dim",
        av_pooling="strided",
        ffn_copy="weights_only_exact_gelu",
        llama_ffn="additive",
        grad_accum="sum_drop_tail",
        grad_clip="value_mm_only",
        weight_decay="exempt_biases_only",
        eval_precision="bf16",
        mm_norm_eps="official",
    ),
}
ParityMode = Literal[tuple(PARITY_FLAGS)]


def parity_flags(mode: str) -> ParityFlags:
    """Return the `ParityFlags` of a mode name ('corrected' or 'official')."""
    try:
        return PARITY_FLAGS[mode]
    except KeyError:
        raise ConfigError(f"parity: expected one of {sorted(PARITY_FLAGS)}, found {mode!r}") from None


@dataclass
class AVEncoderConfig:
    """Audiovisual encoder (reference §1.3): two 3-layer pre-norm encoders fused to d_model."""

    audio_dim: PositiveInt | None = None
    vision_dim: PositiveInt | None = None
    """Da, Dv: the encoder's input widths. None (every recipe): the data's, set by `with_av_widths`
    when the data is read; a given width must equal the data's (ConfigError otherwise)."""
    d_model: PositiveInt = 30
    n_heads: PositiveInt = 6
    n_layers: PositiveInt = 3
    ff_mult: PositiveInt = 4
    dropout: Probability = 0.1
    max_len: PositiveInt = 50
    """L_av: raw sequences are pooled to this many steps."""
    p_perm: Fraction = 0.2
    """SoftPerm probability of replacing a channel by its time-shuffled copy (training only)."""
    batch_norm_audio: bool = False
    batch_norm_vision: bool = False
    length_masks: bool = False
    """Use per-sample audio/vision lengths to mask pooling, encoder attention and MM
    cross-attention. The official code has no masks, so this is off in every recipe."""


@dataclass
class FusionConfig:
    """Fusion tokens and MM blocks (reference §1.5-1.8)."""

    n_tokens: PositiveInt = 8
    mm_layers: tuple[int, ...] = ()
    """0-based LM blocks after which an MM block runs (at least one; every recipe sets them, and
    `presets.adapt_to_backbone` moves them to another backbone's depth)."""
    n_heads: PositiveInt = 16
    ffn_all_rows: bool = True
    """The MM FFN runs on every row, text and fusion (True: the official `combine`, every
    recipe), or on the fusion rows only."""
    gate: GateKind = "sigmoid"
    gate_init: float = 0.0
    ffn_gate_init: float = 0.0
    dropout: Probability = 0.1
    lora_rank: NonNegativeInt = 0
    """LoRA rank on the MM FFN (through peft); 0 trains the copied FFN fully."""
    lora_alpha: Positive = 16.0
    lora_dropout: Probability = 0.05
    xattn_form: Literal["auto", "plain", "absorbed"] = "auto"
    """Cross-attention evaluation order; all three compute the same function."""


@dataclass
class TextConfig:
    """Transcript tokenisation and text augmentation."""

    max_tokens: PositiveInt = 50
    """L: transcripts are truncated to L tokens; fusion tokens sit at positions L..L+n-1."""
    seqaug: bool = False
    """Text SoftPerm on token embeddings (GPT-2 recipes)."""
    p_perm: Fraction = 0.2
    p_apply: Fraction = 0.25


@dataclass
class LossConfig:
    """Loss weights (reference §2.1): L = task + w_fusion*L_f + w_av*L_av + w_text*L_t + w_clm*L_clm."""

    w_fusion: NonNegative = 1.0
    w_av: NonNegative = 1.0
    w_text: NonNegative = 1.0
    w_clm: NonNegative = 0.0
    """gamma; 0 skips the LM head entirely."""


@dataclass
class ModelConfig:
    """Everything needed to rebuild a DeepMLF model around a backbone."""

    backbone: Annotated[str, Check(lambda v: bool(v.strip()), "a backbone name or path")] = "smollm2-135m"
    av: AVEncoderConfig = field(default_factory=AVEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    head_hidden: PositiveInt = 64
    parity: ParityMode = "corrected"
    text_prefix_no_grad: bool = True
    """Run text rows below the first MM block without autograd (they cannot depend on
    any trained parameter); exact, saves backward work and activation memory."""
    recompute_lm_blocks: bool = False
    """Activation checkpointing of the frozen LM blocks that run with autograd: keep only
    each block's input and recompute the block in backward (less memory, ~15% more time)."""
    quant: QuantName = "none"
    """Quantization of the frozen backbone's decoder linears (`backbones.quantize`)."""
    random_init: bool = False
    """Build the backbone architecture with random weights (smoke tests, benchmarks)."""

    @property
    def flags(self) -> ParityFlags:
        return parity_flags(self.parity)


@dataclass
class OptimConfig:
    """Stage-2 (DeepMLF) optimisation (reference §2.5-2.7)."""

    lr_mm: Positive = 1e-4
    lr_av: Positive = 1e-4
    weight_decay_mm: NonNegative = 0.001
    weight_decay_av: NonNegative = 0.001
    betas: tuple[float, float] = (0.9, 0.95)
    eps: Positive = 1e-8
    batch_size: PositiveInt = 32
    grad_accum: PositiveInt = 8
    grad_clip: NonNegative = 5.0
    warmup_epochs: NonNegative = 1.0
    cosine_epochs: PositiveInt = 150
    """Cosine period in epochs (official `max_epochs`); warm restarts after it."""
    eta_min: NonNegative = 1e-7
    max_epochs: PositiveInt = 200
    """Hard cap on epochs; early stopping usually ends training first."""
    early_stop: PositiveInt = 30
    key_metric: Literal["Loss", "MAE"] = "MAE"


@dataclass
class AVPretrainConfig:
    """Stage 1: AV-encoder pretraining (`bienc`, reference §2.8)."""

    enabled: bool = True
    lr: Positive = 1e-3
    weight_decay: NonNegative = 0.01
    batch_size: PositiveInt = 32
    grad_accum: PositiveInt = 4
    grad_clip: NonNegative = 1.0
    plateau_patience: NonNegativeInt = 10
    early_stop: PositiveInt = 8
    max_epochs: PositiveInt = 100
    max_len: PositiveInt | None = None
    """L_av for stage 1 (SIMS pools to 39 there); None: same as stage 2."""


@dataclass
class DataConfig:
    """Where the data comes from and what it must look like."""

    path: str | None = None
    """MMSA .pkl or converted .npz; None: the embedded synthetic default."""
    dataset: DatasetName = "mosi"
    audio_dim: PositiveInt | None = None
    vision_dim: PositiveInt | None = None
    """The feature widths a data file must have; None: the dataset's standard MMSA widths."""
    num_workers: NonNegativeInt = 0
    synthetic_sizes: tuple[int, int, int] = (600, 150, 300)
    """train/valid/test sizes of the embedded synthetic data used when `path` is None."""
    synthetic_seed: NonNegativeInt = 0


@dataclass
class TrainConfig:
    """Run-level settings."""

    output_dir: Annotated[str, Check(lambda v: bool(v.strip()), "a directory path")] = "runs/default"
    seeds: tuple[int, ...] = (1990,)
    precision: Literal["auto", PrecisionName] = "auto"
    """Backbone weights and autocast together: 'auto' takes `recipe_precision` where the
    device runs bf16 natively and fp32 elsewhere (`deepmlf_fast.hardware`)."""
    recipe_precision: PrecisionName = "fp32"
    """The precision the recipe was released with (bf16 for SmolLM2, fp32 for GPT-2)."""
    tf32: bool = False
    """fp32 matrix products on TF32 tensor cores (CUDA only; the official code did not)."""
    device: str = "auto"
    eval_batch_size: PositiveInt = 64
    log_every: PositiveInt = 10
    backend: AttentionBackend = "auto"
    """Attention op backend: Triton on CUDA, the PyTorch reference elsewhere."""
    deepspeed: str | None = None
    """DeepSpeed JSON config; None trains in one process without DeepSpeed."""
    skip_nonfinite: NonNegativeInt = 0
    """Optimiser steps with a non-finite loss or gradient that may be skipped (logged) before
    training stops; 0 stops at the first (single process; DeepSpeed always stops)."""


@dataclass
class Resolved:
    """What a run decided from the hardware it ran on (`deepmlf_fast.hardware`). Written to
    config.json for the record; decided anew by every run, so ignored when a config is read."""

    device: str = ""
    device_name: str = ""
    cpu_capability: str = ""
    native_bf16: bool = False
    precision: str = ""
    precision_reason: str = ""
    eval_precision: str = ""
    tf32: bool = False
    attention_backend: str = ""


@dataclass
class RunConfig:
    """A complete, serialisable description of a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain: AVPretrainConfig = field(default_factory=AVPretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resolved: Resolved = field(default_factory=Resolved)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Rebuild a config from `to_dict`'s output; unknown fields are an error, `resolved` is dropped."""
        cfg = _from_dict(cls, _upgraded(d), "config")
        return dataclasses.replace(cfg, resolved=Resolved())


def _upgraded(d: dict[str, Any]) -> dict[str, Any]:
    """A config written before `model.quant` existed: its `load_in_8bit` / `load_in_4bit`
    become the method they chose, so older runs still resume and report."""
    model = d.get("model") if isinstance(d, dict) else None
    if not isinstance(model, dict) or not {"load_in_8bit", "load_in_4bit"} & set(model):
        return d
    model = dict(model)
    eight, four = model.pop("load_in_8bit", False), model.pop("load_in_4bit", False)
    model.setdefault("quant", "llm-int8" if eight else "nf4" if four else "none")
    return {**d, "model": model}


def _from_dict(cls, d: Any, where: str):
    """Rebuild a (nested) dataclass from a dict, rejecting unknown keys by name."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, found {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(fields)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in d.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _from_dict(typ, value, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


# ------------------------------------------------------------------------------ dotted overrides


def field_path(path: str) -> str:
    """The full dotted path of a field: 'fusion.n_tokens' and 'model.fusion.n_tokens' both
    name `RunConfig.model.fusion.n_tokens` (a first part that is a `ModelConfig` field gets
    'model.' in front). Raises ConfigError for a path that names no field."""
    parts = path.split(".")
    top = {f.name for f in dataclasses.fields(RunConfig)}
    if parts[0] not in top and parts[0] in {f.name for f in dataclasses.fields(ModelConfig)}:
        parts = ["model", *parts]
    _field_type(parts, path)
    return ".".join(parts)


def _field_type(parts: list[str], path: str):
    cls: Any = RunConfig
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{path}: {'.'.join(parts[:i])} is a value, not a section")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(f"{path}: no field {part!r} in {'.'.join(parts[:i]) or 'the config'}; "
                              f"expected one of {sorted(hints)}")
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"{path}: names a section, expected a field inside it ({sorted(typing.get_type_hints(cls))})")
    return cls


def parse_value(path: str, text: str) -> Any:
    """Convert a command-line string to the type of the field at `path` (ints, floats,
    booleans 'true'/'false', literals, comma-separated tuples, 'none' for optional fields)."""
    full = field_path(path)
    if full.startswith("resolved."):
        raise ConfigError(f"{path}: expected a train, data, model, optim or pretrain field; the resolved section "
                          f"records what the run found on this machine (set train.* instead)")
    typ = _field_type(full.split("."), path)
    return _parse(typ, text.strip(), path)


def _parse(typ, text: str, path: str) -> Any:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse(inner[0], text, path)
    if origin is Literal:
        if text not in [str(a) for a in args]:
            raise ConfigError(f"{path}: expected one of {list(args)}, found {text!r}")
        return next(a for a in args if str(a) == text)
    if origin is tuple:
        item, items = args[0], text.split(",") if text else []
        bad = ConfigError(f"{path}: expected comma-separated {item.__name__}s like 3,5,7, found {text!r}")
        if any(not t.strip() for t in items):  # "1,,2" or "1,": a value left out
            raise bad
        try:
            return tuple(_parse(item, t, path) for t in items)
        except ConfigError:
            raise bad from None
    if typ is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{path}: expected true or false, found {text!r}")
        return text.lower() in ("true", "1", "yes")
    try:
        return typ(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: expected {getattr(typ, '__name__', typ)}, found {text!r}") from None


def apply_overrides(cfg: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """A copy of `cfg` with each dotted path set to its value (values already typed; lists
    become tuples). Raises ConfigError naming a path that does not exist."""
    for path, value in overrides.items():
        parts = field_path(path).split(".")
        cfg = _set(cfg, parts, tuple(value) if isinstance(value, list) else value)
    return cfg


def _set(obj, parts: list[str], value):
    if len(parts) == 1:
        return dataclasses.replace(obj, **{parts[0]: value})
    return dataclasses.replace(obj, **{parts[0]: _set(getattr(obj, parts[0]), parts[1:], value)})


# ------------------------------------------------------------------------------ validation

def choices(path: str) -> tuple[Any, ...]:
    """The values the `Literal` field at dotted `path` accepts (the CLI's `choices=`):
    `choices("data.dataset")` -> `('mosi', 'mosei', 'sims')`."""
    typ = _field_type(field_path(path).split("."), path)
    if typing.get_origin(typ) is not Literal:
        raise TypeError(f"{path}: a {typ} field, not a Literal")
    return typing.get_args(typ)


def _type_rule(typ) -> tuple[Callable[[Any], bool], str]:
    """(predicate, what is expected) of a field's type hint (`Annotated` extras kept)."""
    if typing.get_origin(typ) is Annotated:
        base, check = typing.get_args(typ)[:2]
        is_base = _type_rule(base)[0]
        expected = check.expected.replace("a number", "a finite number") if base is float else check.expected
        return (lambda v: is_base(v) and check.ok(v)), expected
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):  # `X | None`, the only unions of the config
        ok, expected = _type_rule(next(a for a in args if a is not type(None)))
        return (lambda v: v is None or ok(v)), f"{expected} or none"
    if origin is Literal:
        return (lambda v: v in args), f"one of {list(args)}"
    if typ is bool:
        return (lambda v: isinstance(v, bool)), "true or false"
    if typ is int:
        return (lambda v: isinstance(v, int) and not isinstance(v, bool)), "an integer"
    if typ is float:  # NaN and infinities fail range checks silently (every comparison is False)
        return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)), \
            "a finite number"
    if typ is str:
        return (lambda v: isinstance(v, str)), "a string"
    return (lambda v: True), ""  # tuples: the cross-field rules of `validate_config` check their items


def _check_fields(obj, where: str) -> None:
    """Check every field of a (nested) config dataclass against its type hint."""
    for name, typ in typing.get_type_hints(type(obj), include_extras=True).items():
        value, path = getattr(obj, name), f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(typ):
            _check_fields(value, path)
            continue
        ok, expected = _type_rule(typ)
        if not ok(value):
            raise ConfigError(f"{path}: expected {expected}, found {value!r}")


def validate_config(cfg: RunConfig) -> None:
    """Check every field and cross-field rule of a run's configuration (no files, no backbone:
    those are checked where they are read). Raises ConfigError naming the field, what was
    expected and what was found."""
    _check_fields(cfg, "")
    _model_rules(cfg.model, "model.")
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    if not (isinstance(o.betas, tuple) and len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas)):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), found {o.betas!r}")
    if not (isinstance(t.seeds, tuple) and t.seeds and all(isinstance(s, int) and not isinstance(s, bool)
                                                          and 0 <= s < 2**32 for s in t.seeds)):
        raise ConfigError(f"train.seeds: expected one or more integers from 0 to 2**32 - 1 (numpy's seed range), "
                          f"found {t.seeds!r}")
    if len(set(t.seeds)) != len(t.seeds):
        raise ConfigError(f"train.seeds: expected distinct seeds, found {list(t.seeds)}")
    if not (isinstance(d.synthetic_sizes, tuple) and len(d.synthetic_sizes) == 3
            and all(isinstance(n, int) and n >= 1 for n in d.synthetic_sizes)):
        raise ConfigError(f"data.synthetic_sizes: expected three integers >= 1 (train, valid, test), found "
                          f"{d.synthetic_sizes!r}")
    if m.parity == "official" and t.deepspeed:
        raise ConfigError(
            "model.parity: DeepSpeed training needs parity 'corrected' (mean accumulation, global-norm clipping), "
            "found 'official', whose sum accumulation and element-wise MM-side clipping DeepSpeed's engine cannot "
            "reproduce; train --parity official without --deepspeed"
        )


def validate_model_config(m: ModelConfig) -> None:
    """`validate_config`'s checks of a model configuration alone (what `apply_deepmlf` is given),
    its fields named from `ModelConfig` (`fusion.mm_layers`). What depends on the backbone is
    `model.deepmlf.check_model_config`'s."""
    _check_fields(m, "")
    _model_rules(m, "")


def _model_rules(m: ModelConfig, where: str) -> None:
    """Cross-field rules of a model configuration; `where` prefixes the field names."""
    if m.av.d_model % m.av.n_heads:
        raise ConfigError(f"{where}av.n_heads: expected a divisor of av.d_model {m.av.d_model}, found {m.av.n_heads}")
    if not (isinstance(m.fusion.mm_layers, tuple) and m.fusion.mm_layers
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in m.fusion.mm_layers)):
        raise ConfigError(f"{where}fusion.mm_layers: expected a non-empty list of block indices >= 0, found "
                          f"{m.fusion.mm_layers!r}")
    if len(set(m.fusion.mm_layers)) != len(m.fusion.mm_layers):
        raise ConfigError(f"{where}fusion.mm_layers: expected distinct block indices, found duplicate indices in "
                          f"{list(m.fusion.mm_layers)}")


def with_av_widths(cfg: RunConfig, widths: tuple[int, int] | None = None) -> RunConfig:
    """`cfg` with the AV encoder's input widths (`model.av.audio_dim`, `vision_dim`) set to the
    data's `widths` (Da, Dv). `widths` None: the widths the data must have (`data.audio_dim` /
    `vision_dim`, else the dataset's standard ones), for work that reads no data (memory
    estimates, benchmarks). A width the config already gives must equal the data's: else a
    ConfigError naming the field, the data's width and the given one."""
    d = cfg.data
    widths = widths or dataset_spec(d.dataset).widths(d.audio_dim, d.vision_dim)
    av = cfg.model.av
    for name, given, found in zip(("audio_dim", "vision_dim"), (av.audio_dim, av.vision_dim), widths):
        if given is not None and given != found:
            raise ConfigError(f"model.av.{name}: expected the data's width {found}, found {given}")
    av = dataclasses.replace(av, audio_dim=widths[0], vision_dim=widths[1])
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, av=av))
