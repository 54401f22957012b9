"""One optimizer step over the target set: fastmask MaskedAdamW (every available backend) against
the dense baselines, on the same tensors in the same run.

Implementations (``impl`` in extra_info):

- ``fastmask:<backend>``: ``MaskedAdamW.step()`` with ``fastmask.backends.use(<backend>)``; every
  backend ``fastmask.backends.available(device)`` reports (``fastmask:reference`` is baseline c);
- ``adamw_fused+mask``: ``torch._foreach_mul_(grads, dense_masks)`` then
  ``torch.optim.AdamW(fused=True).step()`` (what SPU's code does, as fast as stock PyTorch allows);
- ``adamw_foreach+mask``: the same with ``AdamW(foreach=True)``;
- ``original``: the SPU code's style: dense fp32 masks multiplied into each gradient in a Python
  loop over parameters, one param group per parameter, ``AdamW(foreach=False)``.

Bytes: fastmask cases report ``gbps`` = the line-level floor of the device (64 B lines on a CPU,
32 B sectors on a GPU) / mean time; dense baselines report ``gbps`` = their own bytes
(``dense_bytes``, N x 40 for fp32) / mean time. ``floor_gbps`` (floor / time) is recorded for all.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time

import pytest
import torch
from torch import nn

import fastmask
from bench import common
from bench.conftest import options

BASELINES = ("adamw_fused+mask", "adamw_foreach+mask", "original")
LR, WD = 1e-3, 1e-2


def pytest_generate_tests(metafunc):
    o = options(metafunc.config)
    cases, pcases = [], []
    for shape_set in o.shapes:
        for dtype in o.dtypes:
            for device in o.devices:
                impls = [f"fastmask:{b}" for b in o.backends(device)] + list(BASELINES)
                for kind in o.masks:
                    for density in o.densities:
                        key = (shape_set, dtype, device, kind, density)
                        name = f"{shape_set}-{dtype}-{device}-{kind}-{density}"
                        pcases.append(pytest.param(key, id=name))
                        for impl in impls:
                            cases.append(pytest.param(key + (impl,), id=f"{name}-{impl}"))
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", cases)
    if "pcase" in metafunc.fixturenames:
        metafunc.parametrize("pcase", pcases)


def _dense_masks(shapes, idxs, dtype, device):
    out = []
    for s, i in zip(shapes, idxs):
        m = torch.zeros(s, dtype=dtype, device=device)
        m.view(-1)[i.to(device=device, dtype=torch.long)] = 1
        out.append(m)
    return out


class Impl:
    """One implementation's step over its own clones of the shared tensors."""

    def __init__(self, impl: str, shapes, master_p, master_g, idxs, dtype, device):
        self.name = impl
        self.params = [nn.Parameter(p.clone()) for p in master_p]
        for p, g in zip(self.params, master_g):
            p.grad = g.clone()
        grads = [p.grad for p in self.params]
        params = self.params
        self.backend = impl.split(":", 1)[1] if impl.startswith("fastmask:") else None
        if self.backend:
            self.opt = fastmask.MaskedAdamW(params, lr=LR, weight_decay=WD,
                                            masks={p: i.to(device) for p, i in zip(params, idxs)})
            self.fn = self.opt.step
            self.mask_bytes = sum(i.numel() for i in idxs) * 4  # int32 indices (also in opt.state)
            return
        dmasks = _dense_masks(shapes, idxs, torch.float32 if impl == "original" else dtype, device)
        self.mask_bytes = sum(m.numel() * m.element_size() for m in dmasks)
        if impl in ("adamw_fused+mask", "adamw_foreach+mask"):
            kw = {"fused": True} if impl == "adamw_fused+mask" else {"foreach": True}
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, **kw)

            def fn():
                torch._foreach_mul_(grads, dmasks)
                opt.step()
        elif impl == "original":
            opt = torch.optim.AdamW([{"params": [p]} for p in params], lr=LR, weight_decay=WD, foreach=False)

            def fn():
                for p, m in zip(params, dmasks):
                    p.grad.mul_(m)
                opt.step()
        else:
            raise ValueError(f"unknown implementation {impl!r}")
        self.opt, self.fn = opt, fn

    def context(self):
        return fastmask.backends.use(self.backend) if self.backend else contextlib.nullcontext()

    def call(self):
        with self.context():
            self.fn()


def _setup(case, problems, masks, info):
    shape_set, dtype_name, device, kind, density = case[:5]
    dtype = common.DTYPES[dtype_name]
    shapes = common.SHAPE_SETS[shape_set]
    master_p, master_g = problems.get(shape_set, device, dtype)
    idxs = masks.get(shape_set, kind, density)
    elem = torch.tensor([], dtype=dtype).element_size()
    st = common.mask_stats(shapes, idxs, elem)
    info.update(shape_set=shape_set, density=density, mask=kind, device=device, dtype=dtype_name,
                tensors=len(shapes), N=st.n, K=st.k)
    info.update(common.step_bytes(st, elem))
    return shapes, master_p, master_g, idxs, dtype, device, st


def test_masked_step(benchmark, case, problems, masks, opts):
    impl = case[5]
    info = benchmark.extra_info
    info.update(bench="masked_step", impl=impl,
                backend=impl.split(":", 1)[1] if impl.startswith("fastmask:") else None,
                kind="fastmask" if impl.startswith("fastmask:") else "baseline")
    shapes, master_p, master_g, idxs, dtype, device, st = _setup(case, problems, masks, info)
    im = Impl(impl, shapes, master_p, master_g, idxs, dtype, device)
    floor_key = common.floor_key(device)
    with im.context():  # at least 5 rounds: the median must survive a busy, shared machine
        common.run_timed(benchmark, im.fn, device, opts.case_time, min_rounds=5)
    info["opt_state_bytes"] = common.state_bytes(im.opt)
    info["mask_bytes"] = im.mask_bytes
    info["own_bytes"] = info[floor_key] if im.backend else info["dense_bytes"]
    common.record_rate(benchmark, "own_bytes", "gbps")
    common.record_rate(benchmark, floor_key, "floor_gbps")
    # sanity: a fastmask step changed the selected entries only
    if im.backend and st.k:
        changed = sum(int((p.detach() != q).sum()) for p, q in zip(im.params, master_p))
        assert 0 < changed <= st.k, f"{impl}: {changed} entries changed, {st.k} selected"
    del im
    gc.collect()


def test_masked_step_paired(benchmark, pcase, problems, masks, opts):
    """Every implementation of one case, called in turn (rotating order) for at least
    ``--paired-rounds`` rounds (more while they fit in ``--case-time`` per implementation):
    all see the same machine conditions, so their time ratios hold even when other processes
    compete for the cores. ``extra_info["paired"]`` holds each one's median and min time; the
    benchmark's own time is that of the whole interleaved loop."""
    info = benchmark.extra_info
    info.update(bench="masked_step_paired", impl="paired", kind="paired")
    shapes, master_p, master_g, idxs, dtype, device, st = _setup(pcase, problems, masks, info)
    names = [f"fastmask:{b}" for b in opts.backends(device)] + list(BASELINES)
    impls = [Impl(n, shapes, master_p, master_g, idxs, dtype, device) for n in names]
    disabled = getattr(benchmark, "disabled", False)
    times = {n: [] for n in names}
    info["rounds"] = 1

    def loop():
        for im in impls:  # warm-up: lazy optimizer state
            im.call()
        common.sync(device)
        rounds = 1
        if not disabled:  # at least --paired-rounds; more while they fit in case-time per impl
            t0 = time.perf_counter()
            for im in impls:
                im.call()
            common.sync(device)
            once = time.perf_counter() - t0
            rounds = int(min(100, max(opts.paired_rounds, opts.case_time * len(impls) / max(once, 1e-6))))
        info["rounds"] = rounds
        for r in range(rounds):
            order = impls[r % len(impls):] + impls[: r % len(impls)]
            for im in order:
                common.sync(device)
                t0 = time.perf_counter()
                im.call()
                common.sync(device)
                times[im.name].append(time.perf_counter() - t0)

    benchmark.pedantic(loop, rounds=1, iterations=1)
    info["paired"] = {
        n: {"median_s": statistics.median(t), "min_s": min(t),
            "opt_state_bytes": common.state_bytes(im.opt), "mask_bytes": im.mask_bytes}
        for (n, t), im in zip(times.items(), impls)
    }
    del impls
    gc.collect()
