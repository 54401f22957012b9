"""fastmask._files: safetensors files with a reproducible header (masks, deltas)."""
from __future__ import annotations

import subprocess
import sys

import torch
from safetensors import safe_open

from fastmask._files import safetensors_bytes

SCRIPT = r"""
import sys, torch
from fastmask import MaskSet, Mask
from fastmask._files import safetensors_bytes
from fastmask import delta
g = torch.Generator().manual_seed(0)
base = {f"layer{i}.w": torch.randn(7, 5, generator=g) for i in range(6)}
trained = {k: v.clone() for k, v in base.items()}
masks = MaskSet({k: Mask(torch.tensor([1, 4, 9, 30], dtype=torch.int32), (7, 5)) for k in base})
for k in trained:
    trained[k].view(-1)[[1, 4, 9, 30]] += 1.0
masks.save(sys.argv[1] + "/m.safetensors", metadata={f"key{i}": str(i) for i in range(12)})
delta.export(trained, base, masks, sys.argv[1] + "/d.safetensors", metadata={f"k{i}": "v" for i in range(12)})
sys.stdout.buffer.write(safetensors_bytes(base, metadata={f"meta{i}": str(i) for i in range(12)}))
"""


def test_equal_content_gives_equal_bytes_across_processes(tmp_path):
    """safetensors writes its metadata in a per-process hash order; fastmask's files do not depend on it."""
    outs = []
    for i in range(3):
        d = tmp_path / str(i)
        d.mkdir()
        res = subprocess.run([sys.executable, "-c", SCRIPT, str(d)], capture_output=True, check=True)
        outs.append((res.stdout, (d / "m.safetensors").read_bytes(), (d / "d.safetensors").read_bytes()))
    assert outs[0] == outs[1] == outs[2]


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.arange(7, dtype=torch.int32),
               "c": torch.randn(2, generator=g).to(torch.bfloat16)}
    meta = {"zeta": "1", "alpha": "ünïcode", "m": '{"json": [1, 2]}'}
    path = tmp_path / "x.safetensors"
    data = safetensors_bytes(tensors, metadata=meta)
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0
    path.write_bytes(data)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
