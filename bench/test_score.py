"""One score-accumulation pass over the target set.

Implementations (``impl``):

- ``fastmask:<backend>``: ``fastmask.ops.score_accumulate_(scores, grads, mode)`` through every
  available backend;
- ``torch_loop``: the equivalent PyTorch loop, one tensor at a time (``s.add_(g)``,
  ``s.add_(g.abs())``, ``s.addcmul_(g, g)``);
- ``torch_foreach``: the same with ``torch._foreach_*`` ops;
- ``copy``: ``torch._foreach_copy_(scores, grads)``: the copy-bandwidth reference (mode ``-``).

Bytes: an accumulation reads the score and the gradient and writes the score, ``N * (8 + e)``; the
copy reads the gradient and writes the score, ``N * (4 + e)``. ``gbps`` = own bytes / mean time.
"""
from __future__ import annotations

import contextlib
import gc

import pytest
import torch

import fastmask
from bench import common
from bench.conftest import options

MODES = ("grad", "abs", "fisher")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    o = options(metafunc.config)
    cases = []
    for shape_set in o.shapes:
        for dtype in o.dtypes:
            for device in o.devices:
                impls = [f"fastmask:{b}" for b in o.backends(device)] + ["torch_loop", "torch_foreach"]
                combos = [(mode, impl) for mode in MODES for impl in impls] + [("-", "copy")]
                for mode, impl in combos:
                    cases.append(pytest.param((shape_set, dtype, device, mode, impl),
                                              id=f"{shape_set}-{dtype}-{device}-{mode}-{impl}"))
    metafunc.parametrize("case", cases)


def _torch_loop(scores, grads, mode):
    for s, g in zip(scores, grads):
        g = g.float()
        if mode == "grad":
            s.add_(g)
        elif mode == "abs":
            s.add_(g.abs())
        else:
            s.addcmul_(g, g)


def _torch_foreach(scores, grads, mode):
    if grads and grads[0].dtype != torch.float32:
        grads = [g.float() for g in grads]
    if mode == "grad":
        torch._foreach_add_(scores, grads)
    elif mode == "abs":
        torch._foreach_add_(scores, torch._foreach_abs(grads))
    else:
        torch._foreach_addcmul_(scores, grads, grads)


def test_score_accumulate(benchmark, case, problems, opts):
    shape_set, dtype_name, device, mode, impl = case
    dtype = common.DTYPES[dtype_name]
    _, grads = problems.get(shape_set, device, dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    n = sum(g.numel() for g in grads)
    scores = [torch.zeros(g.shape, dtype=torch.float32, device=device) for g in grads]
    info = benchmark.extra_info
    info.update(bench="score", shape_set=shape_set, mode=mode, impl=impl,
                backend=impl.split(":", 1)[1] if impl.startswith("fastmask:") else None,
                kind="fastmask" if impl.startswith("fastmask:") else "baseline",
                device=device, dtype=dtype_name, tensors=len(grads), N=n,
                own_bytes=n * (4 + elem) if impl == "copy" else n * (8 + elem))
    ctx = contextlib.nullcontext()
    if impl.startswith("fastmask:"):
        ctx = fastmask.backends.use(info["backend"])

        def fn():
            fastmask.ops.score_accumulate_(scores, grads, mode)
    elif impl == "torch_loop":
        def fn():
            _torch_loop(scores, grads, mode)
    elif impl == "torch_foreach":
        def fn():
            _torch_foreach(scores, grads, mode)
    else:
        def fn():
            torch._foreach_copy_(scores, grads)
    with ctx:
        common.run_timed(benchmark, fn, device, opts.case_time)
    common.record_rate(benchmark, "own_bytes", "gbps")
    del scores
    gc.collect()
