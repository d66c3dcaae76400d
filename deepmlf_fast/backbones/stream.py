"""Build a backbone one decoder layer at a time, so peak memory is its final footprint plus
one dense layer: the architecture is created on the meta device (shapes only), then each
part (the embeddings, head and norms first, then every decoder layer in turn) is given
memory, filled (random initialisation, or its tensors read from the checkpoint's
safetensors files) and, for a layer, quantized before the next one exists.

Random weights are seeded per part from the part's name, so they do not depend on the
device, the quantization or how many layers come before.
"""

from __future__ import annotations

import json
import zlib
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn

from deepmlf_fast.backbones.arch import ArchSpec

SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_files(path: Path) -> dict[str, Path] | None:
    """A checkpoint directory's `{tensor name: safetensors file}`, or None when it has no
    safetensors weights (a `pytorch_model.bin` checkpoint)."""
    index = path / SAFETENSORS_INDEX
    if index.exists():
        return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.exists():
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def build_streamed(config, spec: ArchSpec, dtype: torch.dtype, device: torch.device, quant_config=None,
                   checkpoint: Path | None = None) -> nn.Module:
    """-> a frozen transformers causal LM built from `config` part by part.

    Args:
        config: the transformers config (its `_attn_implementation` already set).
        spec: where the decoder layers live.
        dtype: floating-point dtype of the dense weights.
        device: where every part is materialised.
        quant_config: a `quantize.quantization_config` result, applied to each decoder layer
            as soon as it is filled; None keeps the layers dense.
        checkpoint: a directory with safetensors weights to read; None initialises randomly
            with the model's own `_init_weights` (seeded per part).
    """
    from transformers import AutoModelForCausalLM

    from deepmlf_fast.backbones.quantize import TorchQuantConfig, prepare_torch_layers, quantize_linear_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    files = safetensors_files(checkpoint) if checkpoint is not None else None
    layers = model.get_submodule(f"{spec.base}.{spec.layers}")
    in_layers = {id(m) for m in layers.modules()}
    names = {id(m): n for n, m in model.named_modules()}
    rest = [m for m in model.modules() if id(m) not in in_layers
            and any(t is not None for t in (*m._parameters.values(), *m._buffers.values()))]
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # meta tensor id -> (meta, real): keeps ties
    # The seeds set here must not move the caller's random streams (CPU, and the GPU built on).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for module in rest:
            _fill(model, [module], names, device, made, files)
        for layer in layers:
            prepared = prepare_torch_layers(layer, quant_config, device) \
                if isinstance(quant_config, TorchQuantConfig) else None
            # A copy per layer: its dense tensors must not outlive the layer's quantization.
            _fill(model, list(layer.modules()), names, device, dict(made), files)
            if quant_config is not None:
                quantize_linear_layers(layer, quant_config, device=device, prepared=prepared)
    model.requires_grad_(False)
    return model


def _fill(model: nn.Module, modules: list[nn.Module], names: dict[int, str], device: torch.device,
          made: dict, files: dict[str, Path] | None) -> None:
    """Materialise `modules`' own tensors on `device`, then fill them: from the checkpoint where
    it has them, else with the model's `_init_weights` (children before parents, as transformers
    does, so a parent's rule for a child wins). A tensor tied to one filled earlier (the output
    embedding) becomes that tensor and is left alone."""
    fresh: dict[str, torch.Tensor] = {}
    owners = []
    for module in modules:
        owns = False
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is None:
                    continue
                if id(t) not in made:
                    real = torch.empty_like(t, device=device)
                    made[id(t)] = (t, nn.Parameter(real, requires_grad=False) if isinstance(t, nn.Parameter) else real)
                    fresh[f"{names[id(module)]}.{key}"] = made[id(t)][1]
                    owns = True
                table[key] = made[id(t)][1]
        if owns or files is None and not module._parameters and not module._buffers:
            owners.append(module)
    loaded = _read(model, modules, names, files, fresh) if files is not None else {}
    if any(name not in loaded for name in fresh):
        torch.manual_seed(zlib.crc32(names[id(modules[0])].encode()))
        for module in reversed(owners):
            model._initialize_weights(module)
    with torch.no_grad():
        for name, t in loaded.items():
            fresh[name].copy_(t)


def _read(model: nn.Module, modules: list[nn.Module], names: dict[int, str], files: dict[str, Path],
          fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of `modules`' `fresh` parameters and buffers, `{name in model: tensor}`.
    A checkpoint saved from the base model names them without its prefix (GPT-2's hub files)."""
    from safetensors import safe_open

    prefix = f"{model.base_model_prefix}."
    wanted: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for module in modules:
        for key, t in (*module._parameters.items(), *module._buffers.items()):
            name = f"{names[id(module)]}.{key}"
            for stored in (name, name.removeprefix(prefix)):
                if t is not None and name in fresh and stored in files:
                    wanted[files[stored]].append((name, stored))
                    break
    out = {}
    for file, pairs in wanted.items():  # opened per part: pages of other parts are never mapped
        with safe_open(file, framework="pt") as f:
            out.update({name: f.get_tensor(stored) for name, stored in pairs})
    return out
