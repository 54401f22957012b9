"""Does stepping inside the backward pass make the step itself faster (the gradient still in cache)?

A stack of Llama-MLP-shaped bf16 blocks (``x + down(silu(gate(x)) * up(x))``) with every weight
masked at ``density`` is trained in two ways from the same start: backward() then step(), and
``MaskedAdamW(step_in_backward=True)``. The rounds alternate the two, so that both see the same
machine load. Recorded per mode (``extra_info``): the median time of a whole iteration (forward,
backward, step) and the median time spent inside ``fastmask.ops.masked_adamw_step_`` per
iteration (the step itself: one call per bucket for the ordinary step, one per parameter inside
backward), and their ratios. The parameters of both runs must stay bit-identical (asserted).

Sizes: ``--shapes tiny`` gives 2 blocks of 64 -> 176 (CI smoke); otherwise 6 blocks of
1024 -> 2816 (one weight's gradient is 5.8 MB in bf16: more than this CPU's 2 MiB L2 per core, less
than its 32 MiB L3), 256 tokens per batch.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch import nn

import fastmask
from bench.conftest import options
from fastmask import MaskedAdamW


class Block(nn.Module):
    def __init__(self, hidden: int, inter: int, dtype: torch.dtype):
        super().__init__()
        self.gate = nn.Linear(hidden, inter, bias=False, dtype=dtype)
        self.up = nn.Linear(hidden, inter, bias=False, dtype=dtype)
        self.down = nn.Linear(inter, hidden, bias=False, dtype=dtype)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def _model(layers: int, hidden: int, inter: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(hidden, inter, dtype) for _ in range(layers)])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model


def _masks(model: nn.Module, density: float) -> dict:
    g = torch.Generator().manual_seed(1)
    out = {}
    for p in model.parameters():
        k = max(1, int(density * p.numel()))
        out[p] = torch.randperm(p.numel(), generator=g)[:k].sort().values.to(torch.int32)
    return out


@pytest.mark.parametrize("density", [0.01, 0.1], ids=["1pct", "10pct"])
def test_step_in_backward_paired(benchmark, density, request):
    o = options(request.config)
    tiny = o.shapes == ["tiny"]
    layers, hidden, inter, tokens = (2, 64, 176, 32) if tiny else (6, 1024, 2816, 256)
    dtype = torch.bfloat16
    rounds = 2 if request.config.getoption("benchmark_disable", False) else max(4, 2 * o.paired_rounds)
    models = {m: _model(layers, hidden, inter, dtype) for m in ("ordinary", "in_backward")}
    opts = {m: MaskedAdamW(models[m].parameters(), lr=1e-4, weight_decay=0.1, masks=_masks(models[m], density),
                           step_in_backward=(m == "in_backward")) for m in models}
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(tokens, hidden, generator=g).to(dtype) for _ in range(rounds + 1)]

    op_time = [0.0]
    real_op = fastmask.ops.masked_adamw_step_

    def timed_op(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real_op(*args, **kwargs)
        finally:
            op_time[0] += time.perf_counter() - t0

    def iteration(mode: str, x: torch.Tensor) -> tuple[float, float]:
        model, opt = models[mode], opts[mode]
        op_time[0] = 0.0
        t0 = time.perf_counter()
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0, op_time[0]

    fastmask.ops.masked_adamw_step_ = timed_op
    try:
        for mode in models:  # warm-up (state, caches, first-call costs)
            iteration(mode, batches[-1])
        totals = {m: [] for m in models}
        ops_t = {m: [] for m in models}
        for r in range(rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for mode in order:
                total, in_op = iteration(mode, batches[r])
                totals[mode].append(total)
                ops_t[mode].append(in_op)
        benchmark.pedantic(iteration, args=("in_backward", batches[0]), rounds=1, iterations=1)
        iteration("ordinary", batches[0])  # keep both runs in step
    finally:
        fastmask.ops.masked_adamw_step_ = real_op

    for (n, a), b in zip(models["ordinary"].named_parameters(), models["in_backward"].parameters()):
        assert torch.equal(a, b), f"{n}: the step in backward diverged from the ordinary step"
    med = {m: statistics.median(v) for m, v in totals.items()}
    med_op = {m: statistics.median(v) for m, v in ops_t.items()}
    info = benchmark.extra_info
    info.update(
        bench="step_in_backward", device="cpu", dtype="bf16", density=density, layers=layers, hidden=hidden,
        inter=inter, tokens=tokens, rounds=rounds,
        iteration_ms={m: 1e3 * v for m, v in med.items()},
        step_ms={m: 1e3 * v for m, v in med_op.items()},
        step_ms_range={m: [1e3 * min(v), 1e3 * max(v)] for m, v in ops_t.items()},
        step_ratio_ordinary_over_in_backward=med_op["ordinary"] / med_op["in_backward"] if med_op["in_backward"] else None,
        iteration_ratio_ordinary_over_in_backward=med["ordinary"] / med["in_backward"],
    )
