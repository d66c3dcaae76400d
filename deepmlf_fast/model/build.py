"""The one constructor of a DeepMLF model: training, evaluation, memory estimates and the
benchmarks all build through `build_deepmlf`."""

from __future__ import annotations

import torch

from deepmlf_fast.backbones.load import LoadedBackbone, backbone_config, load_backbone
from deepmlf_fast.config import ModelConfig
from deepmlf_fast.model.deepmlf import DeepMLF


def build_deepmlf(
    cfg: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    init_seed: int = 0,
    backbone: LoadedBackbone | None = None,
    backend: str = "auto",
) -> tuple[DeepMLF, LoadedBackbone]:
    """-> `(DeepMLF, its LoadedBackbone)`.

    Args:
        cfg: the model configuration.
        dtype: the frozen backbone's weight dtype (`hardware.DTYPES[precision]` of the run).
        device: where the backbone is loaded (the new modules follow it).
        init_seed: seeds the new modules' initialisation, so a model rebuilt from a
            checkpoint's config reproduces every untrained tensor.
        backbone: an already loaded backbone to wrap (a run shares one across its seeds);
            loaded from `cfg` when None.
        backend: attention ops' backend ("auto", "triton", "reference").
    """
    if backbone is None:
        backbone = load_backbone(cfg.backbone, dtype=dtype, quant=cfg.quant, random_init=cfg.random_init,
                                 device=device)
    model = DeepMLF(cfg, backbone.lm, backbone.spec, backbone.pad_id, init_seed=init_seed)
    model.set_backend(backend)
    return model, backbone


def build_deepmlf_on_meta(cfg: ModelConfig) -> DeepMLF:
    """DeepMLF and its backbone on the meta device: shapes and parameter counts, no weights
    (and no checkpoint needed: only the backbone's config is read)."""
    from transformers import AutoModelForCausalLM

    from deepmlf_fast.backbones.arch import arch_for

    config = backbone_config(cfg.backbone)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
        lm.requires_grad_(False)
        return DeepMLF(cfg, lm, arch_for(config.model_type), pad_id=0)
