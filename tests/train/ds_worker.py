"""Multi-process helpers for the DeepSpeed tests: launching gloo ranks and what they run.

Workers are module-level functions so `torch.multiprocessing` (spawn) can import them in
the child processes; each child gets the rank variables a launcher would set.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from deepmlf_fast.config import (
    AVEncoderConfig,
    AVPretrainConfig,
    DataConfig,
    FusionConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
)
from deepmlf_fast.fileio import write_text_atomic

WORLD = 2
MICRO, ACCUM, BATCHES = 4, 2, 5
"""Per rank: micro batch 4, accumulation 2, 5 micro-batches per epoch (groups 2 + 2 + a tail of 1)."""
SEED = 7


def run_config(out_dir, data_path, deepspeed=None, *, noise=True, epochs=2, pretrain=True, **model) -> RunConfig:
    """A tiny-llama run on the 40-sample synthetic file. `noise=False` turns dropout and
    augmentation off (for exact comparisons)."""
    drop = 0.1 if noise else 0.0
    return RunConfig(
        model=ModelConfig(
            backbone="tiny-llama",
            av=AVEncoderConfig(max_len=12, dropout=drop, p_perm=0.2 if noise else 0.0),
            fusion=FusionConfig(n_tokens=4, mm_layers=(1, 3), n_heads=8, dropout=drop),
            text=TextConfig(max_tokens=16),
            loss=LossConfig(w_clm=1.0),
            **model,
        ),
        data=DataConfig(path=str(data_path), dataset="mosi"),
        optim=OptimConfig(
            batch_size=MICRO, grad_accum=ACCUM, lr_mm=1e-3, lr_av=1e-3, warmup_epochs=0.0, cosine_epochs=10,
            max_epochs=epochs, early_stop=10, grad_clip=1.0,
            # Some gradients are zero in theory (a bias before BatchNorm, attention key biases); with
            # the default eps Adam would turn their rounding noise (~1e-9) into lr-sized steps.
            eps=1e-6,
        ),
        pretrain=AVPretrainConfig(enabled=pretrain, max_epochs=1, batch_size=8, grad_accum=1),
        train=TrainConfig(output_dir=str(out_dir), seeds=(SEED,), device="cpu", eval_batch_size=8,
                          deepspeed=None if deepspeed is None else str(deepspeed)),
    )


def make_data(path: Path) -> Path:
    from deepmlf_fast.data import make_synthetic

    return make_synthetic(path, "mosi", WORLD * MICRO * BATCHES, 16, 16, seed=0)


def deepspeed_config(tmp: Path, name: str) -> Path:
    """A shipped config; for ZeRO-3 with persistence off, so even tiny tensors are partitioned."""
    raw = json.loads((Path(__file__).parents[2] / "configs" / "deepspeed" / name).read_text())
    if raw["zero_optimization"]["stage"] == 3:
        raw["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp / name
    write_text_atomic(path, json.dumps(raw))  # every rank writes the same bytes
    return path


def launch(fn, *args, world: int = WORLD) -> None:
    """Run `fn(*args)` on `world` spawned gloo ranks; raises if any rank fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_entry, args=(fn, world, port, args), nprocs=world, start_method="spawn")


def _entry(rank: int, fn, world: int, port: int, args) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), DS_ACCELERATOR="cpu", TQDM_DISABLE="1",
    )
    torch.set_num_threads(1)  # two ranks on two cores
    from deepmlf_fast.train import distributed

    fn(*args)
    distributed.shutdown()


# -- workers ----------------------------------------------------------------------------------
def run_all(tmp: Path, data: Path) -> None:
    """Everything the distributed tests check, in one launch (process start-up and imports
    cost more than the tiny runs): ZeRO-1/2/3 into tmp/zero<N>, ZeRO-3 with an 8-bit backbone
    into tmp/zero3_8bit, ZeRO-2 with a 4-bit backbone into tmp/zero2_4bit."""
    from deepmlf_fast.train import distributed

    distributed.init_process_group()
    for stage in (1, 2, 3):
        out = tmp / f"zero{stage}"
        if distributed.is_main():
            out.mkdir()
        distributed.barrier()
        train_stage(out, data, deepspeed_config(out, f"zero{stage}.json"))
    for name, config, bits in (("zero3_8bit", "zero3.json", 8), ("zero2_4bit", "zero2.json", 4)):
        out = tmp / name
        if distributed.is_main():
            out.mkdir()
        distributed.barrier()
        train_quantized(out, data, deepspeed_config(out, config), bits=bits)


def train_stage(tmp: Path, data: Path, ds_config: Path) -> None:
    """Parity part: 2 epochs of DeepSpeed training without noise, straight through
    `loop.train_epoch`; rank 0 writes the trained weights and the epoch losses. Run part:
    an uninterrupted 2-epoch run (B) and a run stopped after epoch 1 and resumed (A)."""
    from deepmlf_fast.train import distributed
    from deepmlf_fast.train.checkpoint import save_weights
    from deepmlf_fast.train.engine import make_engine
    from deepmlf_fast.train.loop import train_epoch
    from deepmlf_fast.train.run import Session, train_run

    cfg = run_config(tmp / "parity", data, ds_config, noise=False, pretrain=False)
    session = Session(cfg, torch.device("cpu"))
    model = session.new_model(SEED)
    loader = session.loader("train", MICRO, True, SEED)
    assert len(loader) == BATCHES
    engine = make_engine("deepmlf", model, session.cfg, len(loader), tmp / "parity")
    net = engine.wrap(model)
    _check_placement(engine, model)
    losses = [distributed.average_values(train_epoch(net, engine, loader, session.train_ctx, e, cfg.train.log_every))["total"]
              for e in range(2)]
    state = engine.model_state(model)
    if distributed.is_main():
        save_weights(state, tmp / "parity_ds.safetensors")
        (tmp / "parity_losses.json").write_text(json.dumps(losses))

    train_run(run_config(tmp / "B", data, ds_config, epochs=2))
    train_run(run_config(tmp / "A", data, ds_config, epochs=1))
    if distributed.is_main():  # what an interruption after epoch 1 leaves behind
        (tmp / "A" / f"seed_{SEED}" / "result.json").unlink()
        (tmp / "A" / "results.json").unlink()
    distributed.barrier()
    train_run(run_config(tmp / "A", data, ds_config, epochs=2), resume=True)


def train_quantized(tmp: Path, data: Path, ds_config: Path, bits: int) -> None:
    """One epoch under the given config with an 8-bit or 4-bit backbone."""
    from deepmlf_fast.train.engine import make_engine
    from deepmlf_fast.train.run import Session, train_run

    cfg = run_config(tmp / "q", data, ds_config, epochs=1, pretrain=False, quant="llm-int8" if bits == 8 else "nf4")
    session = Session(cfg, torch.device("cpu"))
    model = session.new_model(SEED)
    engine = make_engine("deepmlf", model, session.cfg, BATCHES, tmp / "q_engine")
    _check_placement(engine, model)
    kinds = {type(m).__name__ for m in model.lm.modules()}
    assert ("Linear8bitLt" if bits == 8 else "Linear4bit") in kinds, kinds
    train_run(cfg)
    train_run(run_config(tmp / "dense", data, ds_config, epochs=1, pretrain=False))  # the same run, unquantized


def _check_placement(engine, model) -> None:
    """The frozen LM is outside DeepSpeed's module; under ZeRO-3 trained tensors are partitioned."""
    assert not any(n.startswith("lm.") for n, _ in engine.ds.module.named_parameters())
    assert not any(hasattr(p, "ds_id") for p in model.lm.parameters())
    if engine.stage == 3:
        w = model.mm_blocks["1"].ffn.mlp.up_proj.weight
        assert w.ds_tensor.numel() < w.ds_numel, (w.ds_tensor.numel(), w.ds_numel)
