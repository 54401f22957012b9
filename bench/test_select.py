"""``fastmask.select`` of all target tensors (per-tensor top-k to sorted int32 indices).

Scores: ``random`` (uniform in [0, 1), i.i.d.) or ``scored`` (``fastmask.score`` of a randomly
initialised open_clip model with the shape set's c_fc shapes; see ``bench/conftest.py``). The
scores live on the benchmark device; ``select`` returns CPU masks. ``gbps`` counts one read of the
fp32 scores (``N * 4``) over the mean time: a lower bound on what a selection must move.
"""
from __future__ import annotations

import pytest
import torch

import fastmask
from bench import common
from bench.conftest import options


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    o = options(metafunc.config)
    cases = [pytest.param((s, dev, kind, d), id=f"{s}-{dev}-{kind}-{d}")
             for s in o.shapes for dev in o.devices for kind in o.masks for d in o.densities]
    metafunc.parametrize("case", cases)


def test_select(benchmark, case, masks, opts):
    shape_set, device, kind, density = case
    shapes = common.SHAPE_SETS[shape_set]
    if kind == "random":
        g = torch.Generator().manual_seed(0)
        scores = [torch.rand(s, generator=g) for s in shapes]
    else:
        scores = masks.scores(shape_set)
    scores = {str(i): s.to(device) for i, s in enumerate(scores)}
    n = sum(s.numel() for s in scores.values())
    info = benchmark.extra_info
    info.update(bench="select", shape_set=shape_set, density=density, mask=kind, impl="fastmask.select",
                kind="fastmask", device=device, dtype="fp32", tensors=len(shapes), N=n,
                K=sum(fastmask.num_selected(density, s.numel()) for s in scores.values()), own_bytes=n * 4)
    result = {}

    def fn():
        result["m"] = fastmask.select(scores, density)

    common.run_timed(benchmark, fn, device, opts.case_time, min_rounds=2)
    common.record_rate(benchmark, "own_bytes", "gbps")
    assert result["m"].k == info["K"]
