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

import pytest
import torch
from torch import nn

import fastmask
from bench import common
from bench.conftest import options

BASELINES = ("adamw_fused+mask", "adamw_foreach+mask", "original")
LR, WD = 1e-3, 1e-2


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    o = options(metafunc.config)
    cases = []
    for shape_set in o.shapes:
        for dtype in o.dtypes:
            for device in o.devices:
                impls = [f"fastmask:{b}" for b in o.backends(device)] + list(BASELINES)
                for kind in o.masks:
                    for density in o.densities:
                        for impl in impls:
                            cases.append(pytest.param((shape_set, dtype, device, kind, density, impl),
                                                      id=f"{shape_set}-{dtype}-{device}-{kind}-{density}-{impl}"))
    metafunc.parametrize("case", cases)


def _dense_masks(shapes, idxs, dtype, device):
    out = []
    for s, i in zip(shapes, idxs):
        m = torch.zeros(s, dtype=dtype, device=device)
        m.view(-1)[i.to(device=device, dtype=torch.long)] = 1
        out.append(m)
    return out


def test_masked_step(benchmark, case, problems, masks, opts):
    shape_set, dtype_name, device, kind, density, impl = case
    dtype = common.DTYPES[dtype_name]
    shapes = common.SHAPE_SETS[shape_set]
    master_p, master_g = problems.get(shape_set, device, dtype)
    idxs = masks.get(shape_set, kind, density)
    elem = torch.tensor([], dtype=dtype).element_size()
    st = common.mask_stats(shapes, idxs, elem)
    info = benchmark.extra_info
    info.update(bench="masked_step", shape_set=shape_set, density=density, mask=kind, impl=impl,
                backend=impl.split(":", 1)[1] if impl.startswith("fastmask:") else None,
                kind="fastmask" if impl.startswith("fastmask:") else "baseline",
                device=device, dtype=dtype_name, tensors=len(shapes), N=st.n, K=st.k)
    info.update(common.step_bytes(st, elem))
    floor = info[common.floor_key(device)]

    params = [nn.Parameter(p.clone()) for p in master_p]
    for p, g in zip(params, master_g):
        p.grad = g.clone()
    grads = [p.grad for p in params]
    mask_bytes = 0

    if impl.startswith("fastmask:"):
        backend = info["backend"]
        opt = fastmask.MaskedAdamW(params, lr=LR, weight_decay=WD,
                                   masks={p: i.to(device) for p, i in zip(params, idxs)})
        fn = opt.step
        own_bytes = floor
        ctx = fastmask.backends.use(backend)
        mask_bytes = st.k * 4  # the int32 indices (also counted in opt.state as mask_indices)
    else:
        dmask_dtype = torch.float32 if impl == "original" else dtype
        dmasks = _dense_masks(shapes, idxs, dmask_dtype, device)
        mask_bytes = sum(m.numel() * m.element_size() for m in dmasks)
        if impl == "adamw_fused+mask":
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True)

            def fn():
                torch._foreach_mul_(grads, dmasks)
                opt.step()
        elif impl == "adamw_foreach+mask":
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, foreach=True)

            def fn():
                torch._foreach_mul_(grads, dmasks)
                opt.step()
        else:  # original
            opt = torch.optim.AdamW([{"params": [p]} for p in params], lr=LR, weight_decay=WD, foreach=False)

            def fn():
                for p, m in zip(params, dmasks):
                    p.grad.mul_(m)
                opt.step()
        own_bytes = info["dense_bytes"]
        ctx = contextlib.nullcontext()

    with ctx:  # at least 5 rounds: the median must survive a busy, shared machine
        common.run_timed(benchmark, fn, device, opts.case_time, min_rounds=5)
    info["opt_state_bytes"] = common.state_bytes(opt)
    info["mask_bytes"] = mask_bytes
    info["own_bytes"] = own_bytes
    common.record_rate(benchmark, "own_bytes", "gbps")
    common.record_rate(benchmark, common.floor_key(device), "floor_gbps")
    # sanity: a fastmask step changed the selected entries only
    if impl.startswith("fastmask:") and st.k:
        changed = sum(int((p.detach() != q).sum()) for p, q in zip(params, master_p))
        assert 0 < changed <= st.k, f"{impl}: {changed} entries changed, {st.k} selected"
    del opt, params, grads
    gc.collect()

