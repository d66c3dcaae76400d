"""Per-GPU memory estimate of a DeepMLF training run (`deepmlf estimate-memory`).

Parameters are counted exactly: the backbone and DeepMLF are built on the meta device
(shapes only, no weights, no download). Everything else is arithmetic on those counts
and on the run's shapes, with every assumption listed next to the table it produces.
The activation model follows what autograd keeps for backward in `DeepMLF._run_layers`
(checked against `torch.autograd.graph.saved_tensors_hooks` on the tiny backbones):

* below the first MM block, text rows run without autograd; only the fusion rows keep
  activations there, plus the text rows' recorded keys and values;
* from the first MM block on, every packed row (text + fusion tokens, no padding) keeps
  a decoder layer's activations: the inputs of its two norms (float32 inside HF's
  RMSNorm), q/k/v/o and the log-sum-exp of the varlen attention, and the FFN's
  intermediate activations; frozen linears keep nothing, since no weight gradient is needed;
* each MM block keeps its trained FFN's activations over all rows and its
  cross-attention's over the fusion rows and the AV keys/values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deepmlf_fast.config import RunConfig, with_av_widths

GIB = 1024**3
BUCKET_ELEMENTS = 5e7
"""ZeRO reduce/all-gather bucket size of the shipped configs (`configs/deepspeed/`)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of a DeepMLF model (numbers of elements)."""

    quantizable: int
    """Backbone decoder linear weights (what --quant quantizes)."""
    quantizable_rows: int
    """Their output features in total (LLM.int8 keeps one float32 scale per row)."""
    backbone_other: int
    """Embeddings, LM head, norms, biases: stay in the backbone dtype."""
    trained: int
    mm_block: int
    """Parameters of the largest MM block (ZeRO-3 gathers one block at a time)."""
    frozen_in_model: int
    """Frozen parameters inside DeepMLF itself (LoRA base weights of the MM FFNs)."""
    lm_config: object = field(repr=False, default=None)


def count_parameters(cfg: RunConfig) -> ParamCounts:
    """Build the backbone and DeepMLF on the meta device and count their parameters (the AV
    widths the data must have when `cfg` leaves them to the data)."""
    from deepmlf_fast.model.build import build_deepmlf_on_meta

    model = build_deepmlf_on_meta(with_av_widths(cfg).model)
    lm = model.lm
    output = lm.get_output_embeddings()
    linears = [m for m in lm.modules() if m is not output and (type(m) is torch.nn.Linear or type(m).__name__ == "Conv1D")]
    quantizable = sum(m.weight.numel() for m in linears)
    rows = sum(m.weight.shape[0] if type(m) is torch.nn.Linear else m.weight.shape[1] for m in linears)
    own = list(model.named_parameters())
    return ParamCounts(
        quantizable=quantizable,
        quantizable_rows=rows,
        backbone_other=sum(p.numel() for p in lm.parameters()) - quantizable,
        trained=sum(p.numel() for _, p in own if p.requires_grad),
        mm_block=max(sum(p.numel() for p in b.parameters()) for b in model.mm_blocks.values()),
        frozen_in_model=sum(p.numel() for n, p in own if not p.requires_grad and not n.startswith("lm.")),
        lm_config=lm.config,
    )


def gpu_precision(cfg: RunConfig) -> str:
    """The precision a run of `cfg` uses on a GPU with native bf16 (compute capability >= 8.0):
    the requested one, or under 'auto' the recipe's."""
    return cfg.train.recipe_precision if cfg.train.precision == "auto" else cfg.train.precision


@dataclass(frozen=True)
class Line:
    name: str
    bytes: float
    detail: str


@dataclass
class MemoryEstimate:
    """GPU lines of training (summed), the build's transient line (before training: it adds to
    the frozen backbone's lines only), host-RAM lines (optimizer offload) and assumptions."""

    gpu: list[Line]
    host: list[Line]
    assumptions: list[str]
    title: str
    build: Line | None = None

    @property
    def training(self) -> float:
        return sum(line.bytes for line in self.gpu)

    @property
    def building(self) -> float:
        """Peak while the backbone is built: its final lines plus the build's transient."""
        if self.build is None:
            return 0.0
        return sum(line.bytes for line in self.gpu if line.name.startswith("frozen backbone")) + self.build.bytes

    @property
    def total(self) -> float:
        """The run's peak: training's or building's, whichever is larger."""
        return max(self.training, self.building)

    def format(self) -> str:
        """The table `deepmlf estimate-memory` prints."""
        extra = [self.build] if self.build is not None else []
        width = max(len(line.name) for line in self.gpu + self.host + extra) + 2
        out = [self.title, "", f"{'per GPU':{width}s}{'GiB':>8s}  how"]
        out += [f"{line.name:{width}s}{line.bytes / GIB:8.2f}  {line.detail}" for line in self.gpu]
        if self.build is not None:
            out.append(f"{'training':{width}s}{self.training / GIB:8.2f}  the lines above")
            out.append(f"{self.build.name:{width}s}{self.build.bytes / GIB:8.2f}  {self.build.detail}")
            out.append(f"{'building':{width}s}{self.building / GIB:8.2f}  frozen backbone lines + build transient")
        out.append(f"{'total (estimate)':{width}s}{self.total / GIB:8.2f}")
        if self.host:
            out += ["", f"{'host RAM per rank':{width}s}{'GiB':>8s}"]
            out += [f"{line.name:{width}s}{line.bytes / GIB:8.2f}  {line.detail}" for line in self.host]
        out += ["", "assumptions:"] + [f"  - {a}" for a in self.assumptions]
        return "\n".join(out)


def estimate_memory(
    cfg: RunConfig, *, zero: int = 2, gpus: int = 1, offload: bool = False, text_tokens: int | None = None,
    counts: ParamCounts | None = None,
) -> MemoryEstimate:
    """Per-GPU memory of training `cfg` with DeepSpeed ZeRO stage `zero` on `gpus` ranks.

    Args:
        cfg: the run (backbone, quantization, MM layers, batch size per GPU, precision).
        zero: ZeRO stage 0-3 (the frozen backbone is replicated at every stage).
        offload: CPU optimizer offload (master weights, Adam moments, fp32 gradients on the host).
        text_tokens: transcript tokens per sample; default `text.max_tokens`, the longest
            batch, which sets the peak.
        counts: precomputed `count_parameters(cfg)`.
    """
    counts = counts or count_parameters(cfg)
    m, o = cfg.model, cfg.optim
    c = counts.lm_config
    world, stage = gpus, zero
    precision = gpu_precision(cfg)
    bf16 = precision == "bf16"
    pbytes = 4  # trained params and gradients stay float32; bf16 is autocast (DeepSpeed's torch_autocast)
    backbone_dtype = "bfloat16" if bf16 else "float32"
    lm_bytes = DTYPE_BYTES[backbone_dtype]
    act = 2 if bf16 else lm_bytes  # activation dtype in the backbone (autocast, else its own dtype)
    mm_act = 2 if bf16 else 4
    p = counts.trained + counts.frozen_in_model

    def shard(n: float, on: bool) -> float:
        return n / world if on else n

    gpu: list[Line] = []
    host: list[Line] = []
    quant = backbone_dtype if m.quant == "none" else m.quant
    if m.quant in ("llm-int8", "int8-weight-only", "fp8", "int8-dynamic"):
        qbytes = counts.quantizable + 4 * counts.quantizable_rows
        qhow = f"{'int8' if m.quant != 'fp8' else 'e4m3'} weights + one float32 scale per row"
    elif m.quant == "nf4":
        qbytes = counts.quantizable * (0.5 + 1 / 64 + 4 / (64 * 256))
        qhow = "NF4 (0.5 B) + double-quantized absmax per 64-block"
    else:
        qbytes, qhow = counts.quantizable * lm_bytes, backbone_dtype
    gpu.append(Line("frozen backbone: decoder linears", qbytes,
                    f"{counts.quantizable / 1e9:.2f}B params, {qhow}, replicated on every GPU"))
    gpu.append(Line("frozen backbone: embeddings, head, norms", counts.backbone_other * lm_bytes,
                    f"{counts.backbone_other / 1e6:.0f}M params in {backbone_dtype}"))
    gpu.append(Line("trained parameters", shard(p * pbytes, stage == 3),
                    f"{counts.trained / 1e6:.1f}M params x {pbytes} B" + (f" / {world} (ZeRO-3)" if stage == 3 else "")))
    if bf16:  # autocast keeps the bf16 cast of every trained weight it used until the forward ends
        cached = 2 * counts.mm_block * 2 if stage == 3 else counts.trained * 2
        gpu.append(Line("bf16 weight copies (autocast cache)", cached,
                        "the gathered MM blocks' weights x 2 B (ZeRO-3)" if stage == 3 else "trained params x 2 B"))
    gpu.append(Line("gradients", shard(counts.trained * pbytes, stage >= 2),
                    f"{pbytes} B/param" + (f" / {world} (ZeRO-{stage})" if stage >= 2 else ", every rank")))
    # ZeRO-1/2 clone their partition of the weights as the optimizer's fp32 master copy
    # (even when the weights are fp32); ZeRO-3 and plain data parallelism step the weights in place.
    master = counts.trained * 4 * (stage in (1, 2))
    state_lines = [
        Line("fp32 master weights", shard(master, True), f"ZeRO-1/2 only: 4 B/param / {world}"),
        Line("Adam moments", shard(counts.trained * 8, stage >= 1), "2 x 4 B/param" + (f" / {world}" if stage >= 1 else "")),
    ]
    (host if offload else gpu).extend(line for line in state_lines if line.bytes)
    if stage in (1, 2):
        gpu.append(Line("ZeRO buckets", 2 * BUCKET_ELEMENTS * pbytes, "reduce + all-gather buckets of 5e7 elements"))
    elif stage == 3:
        gpu.append(Line("ZeRO-3 gathered MM blocks", 2 * counts.mm_block * pbytes,
                        "the block in use + the prefetched one, full size"))

    gpu.extend(_activations(cfg, c, o.batch_size, text_tokens or m.text.max_tokens, act, mm_act))
    lin = {"none": "dense", "llm-int8": "LLM.int8", "nf4": "NF4", "int8-weight-only": "int8 weight-only",
           "fp8": "FP8 weight-only", "int8-dynamic": "int8 dynamic"}[m.quant]
    assumptions = [
        f"{world} GPU{'s' * (world > 1)}, DeepSpeed ZeRO-{stage}{' with CPU optimizer offload' if offload else ''}; "
        f"the frozen backbone is never handed to ZeRO, so it is replicated at every stage",
        f"micro batch {o.batch_size} per GPU, every transcript {text_tokens or m.text.max_tokens} tokens "
        f"(the longest batch sets the peak) + {m.fusion.n_tokens} fusion tokens, L_av = {m.av.max_len}",
        f"precision {precision} (a GPU with native bf16): trained params, gradients and optimizer state in fp32"
        f"{' (bf16 is autocast)' if bf16 else ''}, backbone activations {'bf16' if act == 2 else 'fp32'}; "
        f"backbone {quant} ({lin} linears)",
        f"MM blocks after backbone blocks {list(m.fusion.mm_layers)}; "
        + (f"text rows up to block {min(m.fusion.mm_layers)} run without autograd" if m.text_prefix_no_grad
           else "text rows run with autograd in every block")
        + ("; the other backbone blocks are recomputed in backward (--recompute-lm-blocks)" if m.recompute_lm_blocks
           else ""),
        "attention saves q, k, v, o and log-sum-exp (FlashAttention-style kernels); the CPU reference path saves padded copies",
        "not included: CUDA context and allocator reserve (~0.5-2 GiB; on CPU, the Python and torch runtime, "
        "~0.5 GiB), the data batch, kernel workspaces; training adds its transient lines to the rest (an upper "
        "bound: they do not all peak together); the total is the larger of training and building",
    ]
    title = (f"deepmlf estimate-memory: {m.backbone} ({quant}), DeepMLF with {len(m.fusion.mm_layers)} MM blocks, "
             f"{counts.trained / 1e6:.1f}M trained params, batch {o.batch_size}/GPU, ZeRO-{stage}, {world} GPU(s)")
    build = _build_line(counts, lm_bytes, backbone_dtype) if m.quant != "none" else None
    return MemoryEstimate(gpu=gpu, host=host, assumptions=assumptions, title=title, build=build)


def _ffn_width(c) -> int:
    """The decoder FFN's inner width of a transformers config (Llama `intermediate_size`, GPT-2
    `n_inner`, else 4 x hidden)."""
    return getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size


def _build_line(counts: ParamCounts, lm_bytes: int, dtype: str) -> Line:
    """What building the backbone holds besides its final weights (before training starts, so it
    never meets the activations): a quantized backbone is built one decoder layer at a time
    (`backbones.stream`), each layer dense in the backbone dtype until it is quantized, plus the
    float32 working copy of the linear being quantized."""
    c = counts.lm_config
    layers = c.num_hidden_layers
    inner = _ffn_width(c)
    layer = counts.quantizable / layers * lm_bytes
    working = 4 * c.hidden_size * inner
    return Line("backbone build (transient)", layer + working,
                f"one dense decoder layer ({counts.quantizable / layers / 1e6:.0f}M params in {dtype}) + the float32 "
                f"copy of its largest linear being quantized; before training")


def _activations(cfg: RunConfig, c, batch: int, text_len: int, act: int, mm_act: int) -> list[Line]:
    """Activation lines (bytes kept for backward) from the model's shapes."""
    m = cfg.model
    llama = c.model_type != "gpt2"
    dim = c.hidden_size
    inner = _ffn_width(c)
    heads = c.num_attention_heads
    kv_dim = getattr(c, "num_key_value_heads", heads) * (dim // heads)
    n_layers = c.num_hidden_layers
    n_text, n_fusion = batch * text_len, batch * m.fusion.n_tokens
    rows = n_text + n_fusion
    if llama:  # two RMSNorms (fp32 upcast), varlen attention, SwiGLU
        per_row = 2 * (4 * dim + 4) + (2 * dim + 2 * kv_dim) * act + 4 * heads + 3 * inner * act
    else:  # two LayerNorms, attention, GELU-tanh MLP (its elementwise chain keeps ~4 copies)
        per_row = 2 * (dim * act + 8) + 4 * dim * act + 4 * heads + (4 * inner + dim) * act
    mm = sorted(m.fusion.mm_layers)
    split = mm[0] if m.fusion.ffn_all_rows else n_layers - 1
    lines = []
    if m.text_prefix_no_grad:
        lower, upper = split + 1, n_layers - split - 1
        lines.append(Line("activations: blocks below first MM", lower * (n_fusion * per_row + n_text * 2 * kv_dim * act),
                          f"{lower} blocks: fusion rows only ({n_fusion}) + text K/V ({n_text} rows)"))
    else:
        lower, upper = 0, n_layers
    if m.recompute_lm_blocks:
        lines.append(Line("activations: backbone blocks (recomputed)", upper * rows * dim * act,
                          f"{upper} blocks x {rows} packed rows: only each block's input is kept"))
    else:
        lines.append(Line("activations: backbone blocks", upper * rows * per_row,
                          f"{upper} blocks x {rows} packed rows x {per_row / 1024:.0f} KiB"))
    ffn_rows = rows if m.fusion.ffn_all_rows else n_fusion
    ffn = (4 * dim + 4 * inner) * mm_act if llama else (3 * dim + 2 * inner) * mm_act
    xattn = n_fusion * 5 * dim * mm_act + batch * m.av.max_len * 2 * dim * mm_act
    xattn += batch * m.fusion.n_heads * m.fusion.n_tokens * m.av.max_len * 4
    lines.append(Line("activations: MM blocks", len(mm) * (ffn_rows * ffn + xattn),
                      f"{len(mm)} blocks: FFN over {ffn_rows} rows, cross-attention to {m.av.max_len} AV steps"))
    av = 2 * m.av.n_layers * batch * m.av.max_len * 32 * m.av.d_model * 4
    head_rows = batch + n_fusion + (n_text if m.loss.w_clm > 0 else 0)
    other = av + head_rows * dim * 4 + 2 * rows * dim * act
    if m.loss.w_clm > 0:
        vocab = c.vocab_size
        other += n_text * dim * 4  # the chunked CE keeps d(loss)/d(hidden) in fp32
        chunk = min(1024, n_text)
        lines.append(Line("causal-LM loss (transient)", 3 * chunk * vocab * 4 + vocab * dim * 4,
                          f"one {chunk}x{vocab} logits chunk (x3) + fp32 copy of the LM head"))
    lines.append(Line("activations: embeddings, AV encoder, heads", other, "packing, final norm, AV encoder, heads"))
    lines.append(Line("backward workspace (transient)", rows * per_row, "about one backbone block's activations"))
    return lines


README_SETTINGS: tuple[tuple[str, str, dict, int, int], ...] = (
    ("fp32", "stored", {}, 2, 1),
    ("bf16 autocast", "stored", {"train.precision": "bf16"}, 2, 1),
    ("bf16 autocast", "`--recompute-lm-blocks`", {"train.precision": "bf16", "model.recompute_lm_blocks": True}, 2, 1),
    ("bf16, ZeRO-3 on 8 GPUs", "stored", {"train.precision": "bf16"}, 3, 8),
)
"""The README's Llama-7B rows: (precision label, activations label, overrides, ZeRO stage, GPUs)."""


def readme_table() -> str:
    """The README's Markdown table of per-GPU estimates for Llama-7B in LLM.int8 with the MOSEI
    recipe at batch 32 (what `deepmlf estimate-memory` prints as `total`), generated here so the
    README cannot drift from the code (tests/test_memory.py checks it)."""
    from deepmlf_fast.config import apply_overrides
    from deepmlf_fast.presets import adapt_to_backbone, recipe

    base = apply_overrides(adapt_to_backbone(recipe("mosei-gpt2"), "llama-7b"),
                           {"model.quant": "llm-int8", "optim.batch_size": 32})
    counts = count_parameters(base)
    lines = ["| precision | activations | total estimate |", "|---|---|---|"]
    for precision, activations, overrides, zero, gpus in README_SETTINGS:
        cfg = apply_overrides(base, overrides)
        est = estimate_memory(cfg, zero=zero, gpus=gpus, counts=counts)
        lines.append(f"| {precision} | {activations} | {est.total / GIB:.1f} GiB |")
    return "\n".join(lines)
