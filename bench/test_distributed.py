"""DDP on 2 CPU processes (gloo): fastmask's sparse all-reduce hook vs plain DDP.

Two things are timed (``what``):

- ``step``: one training iteration per round on every rank: forward, backward (DDP all-reduces
  the gradients bucket by bucket), ``MaskedAdamW.step()``, ``zero_grad()``;
- ``allreduce``: only the communication of a prepared gradient set: the hook called on every
  bucket of the same layout (25 MiB buckets over the parameters in order, objects with the
  ``GradBucket`` methods the hooks use), then all futures awaited; ``ddp`` is torch's own
  ``default_hooks.allreduce_hook`` (divide, all-reduce the whole bucket), ``hook`` fastmask's.

The model is the shape set's c_fc
weights as parameters, with ``loss = sum_i (w_i * c_i).sum()`` for fixed per-rank random ``c_i``
(so backward is one elementwise pass and the gradients differ across ranks); the masks are random
at the case's density, the same on both ranks. DDP runs with its defaults (25 MB buckets,
``gradient_as_bucket_view=False``); each rank uses one thread (2 ranks on 2 cores here).

Implementations (``impl``): ``ddp`` (no hook: DDP's built-in all-reduce of every gradient entry)
and ``hook`` (``fastmask.distributed.masked_allreduce_hook``: only the selected entries of the
masked gradients, plus dense ones, of which this model has none). The optimizer is the same
``MaskedAdamW`` in both, so the difference is the communication and the hook's gather/scatter.

Rounds are driven from this (pytest) process: one round sends "step" to both ranks and waits for
both, so a round's time is the slower rank's iteration plus a pipe round trip (~0.1-0.3 ms).
``extra_info``: ``allreduce_bytes`` (bytes all-reduced per step per rank, counted by the hook
state; ``N * 4`` for plain DDP), ``dense_bytes`` (``N * 4``), ``bytes_ratio``. The paired case
alternates the two implementations round by round (``--paired-rounds``) and records both medians
and their ratio (``time_ratio`` = ddp time / hook time: above 1, the hook is faster).
"""
from __future__ import annotations

import math
import statistics
import time

import pytest
import torch
from torch import nn

from bench import common
from bench.conftest import options

IMPLS = ("ddp", "hook")
WHAT = ("step", "allreduce")
WORLD = 2
LR, WD = 1e-4, 1e-2

torch_dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not (torch_dist.is_available() and torch_dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def pytest_generate_tests(metafunc):
    o = options(metafunc.config)
    keys = [(w, s, d) for w in WHAT for s in o.shapes for d in o.densities]
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", [pytest.param(k + (i,), id=f"{k[0]}-{k[1]}-cpu-{k[2]}-{i}") for k in keys
                                      for i in IMPLS])
    if "pcase" in metafunc.fixturenames:
        metafunc.parametrize("pcase", [pytest.param(k, id=f"{k[0]}-{k[1]}-cpu-{k[2]}") for k in keys])


# ------------------------------------------------------------------------------------------------
# on the ranks (module-level functions, run by tests.test_distributed's worker processes)
# ------------------------------------------------------------------------------------------------
_CASES: dict = {}
BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


class _Bucket:
    """The ``GradBucket`` methods the hooks call, over a flat buffer the bucket's gradients view."""

    def __init__(self, index, buffer, params, grads):
        self._index, self._buffer, self._params, self._grads = index, buffer, params, grads

    def index(self):
        return self._index

    def buffer(self):
        return self._buffer

    def gradients(self):
        return self._grads

    def parameters(self):
        return self._params

    def is_last(self):
        return False


def _buckets(params, coefs):
    """Consecutive params in buckets of at most ``BUCKET_BYTES`` (at least one param each); the
    buffers hold the prepared gradients."""
    groups, cur, size = [], [], 0
    for p, c in zip(params, coefs):
        if cur and size + p.numel() * 4 > BUCKET_BYTES:
            groups.append(cur)
            cur, size = [], 0
        cur.append((p, c))
        size += p.numel() * 4
    groups.append(cur)
    out = []
    for i, group in enumerate(groups):
        buffer = torch.cat([c.reshape(-1) for _, c in group])
        grads, pos = [], 0
        for p, _ in group:
            grads.append(buffer[pos : pos + p.numel()].view(p.shape))
            pos += p.numel()
        out.append(_Bucket(i, buffer, [p for p, _ in group], grads))
    return out


class _Weights(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.ParameterList([nn.Parameter(0.02 * torch.randn(s, generator=g)) for s in shapes])

    def forward(self, coefs):
        return sum((w * c).sum() for w, c in zip(self.w, coefs))


def _setup(rank, world, key, what, shape_set, density, impl):
    import fastmask
    from fastmask.distributed import MaskedAllreduceState, masked_allreduce_hook

    shapes = common.SHAPE_SETS[shape_set]
    model = _Weights(shapes)
    g = torch.Generator().manual_seed(100 + rank)
    by_shape = {s: 1e-3 * torch.randn(s, generator=g) for s in dict.fromkeys(shapes)}
    coefs = [by_shape[s] for s in shapes]
    idxs = common.random_masks(shapes, density)  # same seed: same masks on every rank
    opt = fastmask.MaskedAdamW(model.parameters(), lr=LR, weight_decay=WD, masks=dict(zip(model.w, idxs)))
    state = MaskedAllreduceState(opt) if impl == "hook" else None
    if what == "allreduce":
        _CASES[key] = (what, _buckets(list(model.w), [c.clone() for c in coefs]), state)
    else:
        ddp = nn.parallel.DistributedDataParallel(model)
        if state is not None:
            ddp.register_comm_hook(state, masked_allreduce_hook)
        _CASES[key] = (what, (ddp, opt, coefs), state)
    n = sum(math.prod(s) for s in shapes)
    return dict(N=n, K=sum(i.numel() for i in idxs), threads=torch.get_num_threads())


def _step(rank, world, key):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from fastmask.distributed import masked_allreduce_hook

    what, obj, state = _CASES[key]
    before = state.bytes_reduced if state is not None else 0
    if what == "allreduce":
        if state is None:
            futs = [default_hooks.allreduce_hook(None, b) for b in obj]
        else:
            futs = [masked_allreduce_hook(state, b) for b in obj]
        torch.futures.wait_all(futs)
        sent = sum(b.buffer().numel() * 4 for b in obj)
    else:
        ddp, opt, coefs = obj
        ddp(coefs).backward()
        opt.step()
        opt.zero_grad()
        sent = sum(p.numel() * p.element_size() for p in ddp.module.parameters())
    return sent if state is None else state.bytes_reduced - before


def _teardown(rank, world, *keys):
    import gc

    for k in keys:
        _CASES.pop(k, None)
    gc.collect()


# ------------------------------------------------------------------------------------------------
# in pytest
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks():
    from tests.test_distributed import RankPool

    pool = RankPool(WORLD)
    yield pool
    if not pool.broken:
        pool.close()


def _info(benchmark, what, shape_set, density, impl, meta):
    benchmark.extra_info.update(
        bench=f"ddp_{what}", what=what, shape_set=shape_set, density=density, impl=impl, device="cpu", dtype="fp32",
        backend="gloo", world_size=WORLD, threads_per_rank=meta["threads"], N=meta["N"], K=meta["K"],
        dense_bytes=meta["N"] * 4)


def test_ddp_step(benchmark, case, ranks, opts):
    what, shape_set, density, impl = case
    key = case
    meta = ranks.run(_setup, key, what, shape_set, density, impl)[0]
    _info(benchmark, what, shape_set, density, impl, meta)
    sent = []

    def fn():
        sent.append(ranks.run(_step, key, timeout=600))

    try:
        common.run_timed(benchmark, fn, "cpu", opts.case_time, min_rounds=3, max_rounds=50)
    finally:
        ranks.run(_teardown, key)
    per_step = sent[-1]
    assert per_step[0] == per_step[1]
    info = benchmark.extra_info
    info["allreduce_bytes"] = per_step[0]
    info["bytes_ratio"] = info["dense_bytes"] / max(1, per_step[0])
    t = common.mean_time(benchmark, "median")
    if t:
        info["median_s"] = t
    if impl == "hook":  # selected entries only (this model has no dense parameter)
        assert per_step[0] == meta["K"] * 4
    else:
        assert per_step[0] == meta["N"] * 4


def test_ddp_step_paired(benchmark, pcase, ranks, opts, request):
    """Both implementations set up side by side, stepped alternately: their ratio holds on a busy
    machine where separate cases drift."""
    what, shape_set, density = pcase
    disabled = request.config.getoption("benchmark_disable", False)
    keys = {impl: ("paired", what, shape_set, density, impl) for impl in IMPLS}
    meta = {}
    for impl, key in keys.items():
        meta[impl] = ranks.run(_setup, key, what, shape_set, density, impl)[0]
    _info(benchmark, what, shape_set, density, "paired", meta["hook"])
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    sent = {}

    def one(impl):
        t0 = time.perf_counter()
        sent[impl] = ranks.run(_step, keys[impl], timeout=600)[0]
        times[impl].append(time.perf_counter() - t0)

    rounds = 1 if disabled else max(2, opts.paired_rounds)
    try:
        if not disabled:
            for impl in IMPLS:  # warm-up (lazy state, first-touch page faults, bucket rebuild)
                one(impl)
                one(impl)
            times = {impl: [] for impl in IMPLS}
        for r in range(rounds):
            order = IMPLS if r % 2 == 0 else IMPLS[::-1]
            for impl in order:
                one(impl)
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the record holds the extra_info
    finally:
        ranks.run(_teardown, *keys.values())
    info = benchmark.extra_info
    med = {impl: statistics.median(ts) for impl, ts in times.items()}
    ratios = sorted(d / h for d, h in zip(times["ddp"], times["hook"]))
    info.update(paired=True, rounds=rounds, t_ddp=med["ddp"], t_hook=med["hook"], time_ratio=med["ddp"] / med["hook"],
                time_ratio_rounds=ratios, allreduce_bytes_ddp=sent["ddp"], allreduce_bytes_hook=sent["hook"],
                bytes_ratio=sent["ddp"] / max(1, sent["hook"]))
    assert sent["ddp"] == meta["ddp"]["N"] * 4 and sent["hook"] == meta["hook"]["K"] * 4
    if not disabled:
        tr = request.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(
                f"\n[ddp paired, {what}] {shape_set} density {density}: plain DDP {1e3 * med['ddp']:.1f} ms, hook "
                f"{1e3 * med['hook']:.1f} ms per step (x{info['time_ratio']:.2f}, rounds {ratios[0]:.2f}-"
                f"{ratios[-1]:.2f}); all-reduced {sent['ddp'] / 1e6:.2f} MB vs {sent['hook'] / 1e6:.3f} MB "
                f"(x{info['bytes_ratio']:.1f})")
