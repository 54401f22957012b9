"""``fastmask continual`` under ``torchrun`` (2 CPU processes, gloo on 127.0.0.1): the data is split
across the ranks, every rank scores its shard and the scores are summed (one set of masks, checked
by MaskedAdamW's cross-rank fingerprints), training runs in DDP with the sparse all-reduce hook for
MaskedAdamW, and rank 0 alone logs and writes the outputs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

TINY = ["--limit-per-class", "24", "--pretrain-epochs", "2", "--epochs", "1", "--max-steps", "2", "--batch-size", "8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, tmp_path, nproc=2):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "fastmask.cli", "continual", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def test_job_under_torchrun(tmp_path):
    out = tmp_path / "out"
    proc = _torchrun([*TINY, "--methods", "spu,spu-original,full,frozen", "--cache-dir", str(tmp_path / "cache"),
                      "--out", str(out), "--progress", "never"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["distributed"] == {"world_size": 2, "batch_per_process": 4, "backend": "gloo"}
    assert {r["method"] for r in results["runs"]} == {"spu", "spu-original", "full", "frozen"}
    # one voice: each task line is printed once (rank 0), not once per rank
    lines = [ln for ln in proc.stdout.splitlines() if "seed 0 lr 0.001 spu " in ln]
    assert len(lines) == 2, proc.stdout
    assert sorted(p.name for p in (out / "masks").iterdir())[:1] == ["seed0_lr0.001_spu-original_task1.safetensors"]
    spu = next(r for r in results["runs"] if r["method"] == "spu")
    assert all(row["steps"] == 2 and row["selected"] > 0 for row in spu["tasks"])


def test_batch_size_must_split_evenly(tmp_path):
    proc = _torchrun([*TINY[:-2], "--batch-size", "7", "--cache-dir", str(tmp_path / "cache"),
                      "--out", str(tmp_path / "out")], tmp_path)
    assert proc.returncode != 0
    assert "--batch-size: 7 is the global batch" in proc.stderr + proc.stdout
    assert not (tmp_path / "out" / "results.json").exists()
