"""Resolve a backbone name or path to a local checkpoint and load it, frozen.

Never downloads: hub ids are looked up in the local Hugging Face cache only
(`local_files_only=True`), and a missing one fails with instructions. The pad id is decided
here, once, when the tokenizer is loaded (`tokenizer.pad_token_id`); data and model take it
from the `LoadedBackbone`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from deepmlf_fast.backbones.arch import ArchSpec, arch_for
from deepmlf_fast.backbones.offline import ensure_smollm2_135m, ensure_tiny, offline_tokenizer
from deepmlf_fast.backbones.registry import BACKBONES, BackbonePreset, backbone_names
from deepmlf_fast.backbones.tokenizer import pad_token_id
from deepmlf_fast.errors import BackboneError
from deepmlf_fast.ops import hf_attention
from deepmlf_fast.ops.dropout import Dropout

log = logging.getLogger(__name__)


@dataclass
class LoadedBackbone:
    """A frozen causal LM with what DeepMLF needs to wrap it."""

    lm: torch.nn.Module
    tokenizer: object
    spec: ArchSpec
    pad_id: int
    """The id that pads transcripts and that the last real token predicts in the CLM term."""
    name: str


@dataclass
class ResolvedBackbone:
    """Where a backbone comes from."""

    name: str
    path: Path | None
    """Local checkpoint directory; None only for `random_init` of a hub preset not cached."""
    preset: BackbonePreset | None


def resolve_backbone(name_or_path: str, random_init: bool = False) -> ResolvedBackbone:
    """Turn a preset name, cached hub id or local directory into a `ResolvedBackbone`.

    Raises BackboneError naming the backbone and how to provide it when nothing local exists.
    """
    preset = BACKBONES.get(name_or_path)
    if preset is not None:
        if preset.source == "tiny":
            return ResolvedBackbone(preset.name, ensure_tiny(preset.name, preset.config, preset.tokenizer_family), preset)
        if preset.source == "gguf":
            return ResolvedBackbone(preset.name, ensure_smollm2_135m(), preset)
        for hub_id in preset.hub_ids:
            path = _cached_hub_snapshot(hub_id)
            if path is not None:
                return ResolvedBackbone(preset.name, path, preset)
        if random_init:
            return ResolvedBackbone(preset.name, None, preset)
        raise BackboneError(
            f"backbone {preset.name!r} (hub id {preset.hub_ids[0]!r}) is not available locally. Provide it with "
            f"`huggingface-cli download {preset.hub_ids[0]}` on a machine with network access (deepmlf-fast never "
            f"downloads), or pass --backbone /path/to/checkpoint_dir, or use --random-init to build the "
            f"architecture with random weights"
        )
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BackboneError(f"backbone directory {str(path)!r} has no config.json; is it a transformers checkpoint?")
        return ResolvedBackbone(str(path), path, None)
    if "/" in name_or_path and not path.exists():
        cached = _cached_hub_snapshot(name_or_path)
        if cached is not None:
            return ResolvedBackbone(name_or_path, cached, None)
    raise BackboneError(
        f"backbone {name_or_path!r}: no such preset, local directory or cached hub id. "
        f"Presets: {', '.join(backbone_names())}"
    )


def backbone_config(name_or_path: str):
    """The transformers config of a backbone preset, local checkpoint or cached hub id,
    without loading (or building) weights: dimensions for recipes, validation and memory."""
    from transformers import AutoConfig

    preset = BACKBONES.get(name_or_path)
    if preset is not None:
        kwargs = dict(preset.config)
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return AutoConfig.from_pretrained(resolve_backbone(name_or_path).path, local_files_only=True)


def _cached_hub_snapshot(hub_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
        return None


def load_backbone(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    quant: str = "none",
    random_init: bool = False,
    device: str | torch.device | None = None,
) -> LoadedBackbone:
    """Load a frozen causal LM and its tokenizer.

    The model uses `attn_implementation="deepmlf"` and has every parameter frozen. `quant`
    names a `--quant` method of `backbones.quantize` for the decoder's linears ("none" keeps
    them dense). `random_init` builds the architecture with random weights (the preset's
    dimensions, or the local config when present). Random weights, and a safetensors
    checkpoint quantized by a torch-only method, are built one decoder layer at a time
    (`backbones.stream`): peak memory is the final footprint plus one dense layer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from deepmlf_fast.backbones.quantize import TorchQuantConfig, quantization_config, quantize_linear_layers
    from deepmlf_fast.backbones.stream import build_streamed, safetensors_files

    resolved = resolve_backbone(name_or_path, random_init=random_init)
    attn = hf_attention.register()
    if resolved.path is not None:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, local_files_only=True)
    else:
        tokenizer = offline_tokenizer(resolved.preset.tokenizer_family)
    pad_id = pad_token_id(tokenizer)

    qconfig = quantization_config(quant, dtype)
    device = torch.device(device or "cpu")
    if resolved.path is not None:
        config = AutoConfig.from_pretrained(resolved.path, local_files_only=True)
    else:
        kwargs = dict(resolved.preset.config)
        kwargs["vocab_size"] = len(tokenizer)  # the offline tokenizer stands in for the missing one
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    config._attn_implementation = attn
    spec = arch_for(config.model_type)
    torch_method = isinstance(qconfig, TorchQuantConfig)
    if random_init or torch_method and safetensors_files(resolved.path) is not None:
        model = build_streamed(config, spec, dtype, device, qconfig, checkpoint=None if random_init else resolved.path)
    else:
        kwargs = dict(local_files_only=True, dtype=dtype, attn_implementation=attn)
        if qconfig is not None and not torch_method:  # bitsandbytes: transformers quantizes while loading
            kwargs["quantization_config"] = qconfig
            kwargs["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
        if qconfig is None or torch_method:
            model.to(device)
        if torch_method:  # a .bin checkpoint: loaded dense, then quantized
            quantize_linear_layers(model, qconfig, device=device)
    model.requires_grad_(False)
    fuse_elementwise(model)
    log.info("loaded backbone %s (%s, %d layers, width %d, %s%s)", resolved.name, model.config.model_type,
             model.config.num_hidden_layers, model.config.hidden_size, str(dtype).replace("torch.", ""),
             "" if quant == "none" else f", {quant}")
    return LoadedBackbone(model, tokenizer, spec, pad_id, resolved.name)


def fuse_elementwise(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Swap, in place, the LM's element-wise modules that cost most for faster equivalents; ->
    the swaps as `(parent, attribute, original module)`, for `unfuse_elementwise`.

    * Hugging Face's Python tanh-GELU (`NewGELUActivation`, GPT-2's `gelu_new`) -> the same
      formula as one ATen kernel (`GELUTanh`): the Python form makes eight passes over the
      `(rows, 4D)` activation forward, more in backward, and keeps five for backward; on a
      2-core EPYC it was a fifth of a GPT-2 training step. Equal up to rounding (a few ulp).
    * `nn.Dropout` -> `ops.dropout.Dropout` (same `p`; a mask drawn at half the cost on CPU).
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    faster = {NewGELUActivation: lambda m: GELUTanh(), torch.nn.Dropout: lambda m: Dropout(m.p)}
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) in faster]
    for parent, name, child in swaps:
        setattr(parent, name, faster[type(child)](child))
    return swaps


def unfuse_elementwise(swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
    """Put back the modules `fuse_elementwise` replaced."""
    for parent, name, original in swaps:
        setattr(parent, name, original)
