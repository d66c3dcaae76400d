"""Two "nodes" on one machine: `torchrun --nnodes 2 --node_rank 0/1` over loopback (gloo, static
rendezvous) trains exactly what two ranks of one node train (docs/distributed.md)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = ["--backbone", "tiny-llama", "--precision", "fp32", "--batch-size", "8", "--epochs", "2", "--no-pretrain",
       "--seeds", "3", "--deepspeed", str(REPO / "configs" / "deepspeed" / "zero2.json"),
       "--set", "data.synthetic_sizes=48,16,16", "--set", "text.max_tokens=16", "--set", "av.max_len=12"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nnodes: int, node_rank: int, nproc: int, port: int, out: Path) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
           f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
           str(REPO / "train.py"), "-q", *RUN, "--output-dir", str(out)]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log[-4000:]


@pytest.mark.distributed
def test_two_nodes_over_loopback_train_what_two_ranks_of_one_node_train(tmp_path):
    from deepmlf_fast.backbones.load import resolve_backbone

    resolve_backbone("tiny-llama")  # the cached tiny backbone, built before any rank reads it
    port = _free_port()
    _finish([_torchrun(2, rank, 1, port, tmp_path / "nodes") for rank in (0, 1)])
    _finish([_torchrun(1, 0, 2, _free_port(), tmp_path / "ranks")])
    for name in ("results.json", "seed_3/best.safetensors"):
        assert (tmp_path / "nodes" / name).read_bytes() == (tmp_path / "ranks" / name).read_bytes(), name
