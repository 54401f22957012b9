"""A linear layer's weight gradient at the masked entries only: ``fastmask.ops.sampled_weight_grad``
against the dense product that autograd computes, gathered at the same entries.

One case = one c_fc-shaped layer ``[out, in]`` of the shape set (each distinct shape once: for
``vitb16`` the visual tower's ``[3072, 768]`` and the text tower's ``[2048, 512]``), ``T`` tokens
(``TOKENS``: the tower's sequence length x a batch of 32 on CUDA, 2 on a CPU; batch 2 for ``tiny``),
a uniformly random sorted int32 mask of ``density`` (``bench.common.random_masks``; ``--masks`` is
not used: scored masks need a model and would not change what is timed), ``grad_out`` ``[T, out]``
and ``input`` ``[T, in]`` random in the ``--dtypes`` dtype. Implementations (``impl``):

- ``fastmask:<backend>``: ``fastmask.ops.sampled_weight_grad(grad_out, input, idx)`` under
  ``fastmask.backends.use(<backend>)``, for every backend that can serve the op for this device and
  dtype (``backends.why_not_call``); never Triton on a CPU (only its interpreter runs there);
- ``dense+gather``: ``(grad_out.t() @ input).view(-1)[idx]`` in the input dtype (the whole weight
  gradient, as autograd computes it, then the entries a masked step reads; ``idx`` already int64).

Before timing, each case's result is checked once against the float64 product at the selected
entries: ``|v - ref| <= tol * (|grad_out|.T @ |input|)[idx]``, ``tol = T * 2^-24`` plus the
output's rounding (the worst-case bound of float32 accumulation in any order; a bf16/fp16 output of
the dense product: 4 x its epsilon), so a broken kernel fails instead of timing.

extra_info: ``bench="sampled_grad"``, shape set, ``out_features``/``in_features``, ``batch``,
``seq``, ``T``, density, mask, impl, backend, kind, device, dtype, ``N`` (= out x in), ``K``,
``flops`` (2 K T sampled, 2 N T dense) and ``gflops`` (flops / mean time; ``gflops_median``),
``own_bytes`` (inputs read once, plus the K results and indices; the dense product also writes and
reads its N entries) and ``gbps`` (own bytes / mean time), ``mean_s``/``median_s``, and
``max_err_over_bound`` (the check's largest error / bound, <= 1).
"""
from __future__ import annotations

import contextlib
import gc

import pytest
import torch

import fastmask
from bench import common
from bench.conftest import options

DENSE = "dense+gather"
OP = "sampled_weight_grad"
#: Tokens per sample of the tower a c_fc shape belongs to: ViT patches + class token, text context.
TOKENS: dict[str, dict[tuple[int, int], int]] = {
    "tiny": {(256, 64): 17, (128, 32): 16},  # 32 px images, patch 8; context 16
    "vitb16": {(3072, 768): 197, (2048, 512): 77},  # 224 px, patch 16; context 77
    "vitl14": {(4096, 1024): 257, (3072, 768): 77},  # 224 px, patch 14; context 77
}


def batch_size(shape_set: str, device: str) -> int:
    if shape_set == "tiny":
        return 2
    return 32 if torch.device(device).type == "cuda" else 2


def layer_shapes(shape_set: str) -> list[tuple[int, int]]:
    """The distinct c_fc shapes of the set, in order (visual tower first)."""
    return list(dict.fromkeys(tuple(s) for s in common.SHAPE_SETS[shape_set]))


def op_backends(device: str, dtype: torch.dtype) -> list[str]:
    """Backends that can serve ``sampled_weight_grad`` here, preferred first; no Triton on a CPU."""
    dev = torch.device(device).type
    call = fastmask.backends.Call(dtype=dtype, op=OP)
    names = fastmask.backends.available(dev) + [n for n in fastmask.backends.names()
                                                if n not in fastmask.backends.available(dev)]
    return [n for n in names if not (dev == "cpu" and n == "triton")
            and fastmask.backends.why_not_call(n, dev, call) is None]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    o = options(metafunc.config)
    cases = []
    for shape_set in o.shapes:
        for shape in layer_shapes(shape_set):
            for dtype in o.dtypes:
                for device in o.devices:
                    impls = [f"fastmask:{b}" for b in op_backends(device, common.DTYPES[dtype])] + [DENSE]
                    for density in o.densities:
                        for impl in impls:
                            cases.append(pytest.param(
                                (shape_set, shape, dtype, device, density, impl),
                                id=f"{shape_set}-{shape[0]}x{shape[1]}-{dtype}-{device}-{density}-{impl}"))
    metafunc.parametrize("case", cases)


class Layers:
    """``grad_out``, ``input`` and their float64 products (``grad_out.T @ input`` and of the
    absolute values, for the check) of the most recent (shape, T, device, dtype) only."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, shape, T: int, device: str, dtype: torch.dtype):
        key = (tuple(shape), T, device, dtype)
        if key != self._key:
            self._key = self._value = None
            gc.collect()
            g = torch.Generator().manual_seed(0)
            out_f, in_f = shape
            grad_out = (1e-3 * torch.randn(T, out_f, generator=g)).to(device=device, dtype=dtype)
            inp = torch.randn(T, in_f, generator=g).to(device=device, dtype=dtype)
            go64, x64 = grad_out.double(), inp.double()
            exact = (go64.t() @ x64).view(-1)
            mag = (go64.abs().t() @ x64.abs()).view(-1)
            del go64, x64
            self._key, self._value = key, (grad_out, inp, exact, mag)
        return self._value


@pytest.fixture(scope="module")
def layers():
    return Layers()


def _tolerance(T: int, out_dtype: torch.dtype) -> float:
    """Worst-case relative bound (to sum |g x|) of a float32 sum of T products, any order, with the
    output rounded to ``out_dtype`` (a bf16/fp16 dense product: a few roundings of its epsilon)."""
    acc = T * 2.0**-24
    if out_dtype in (torch.float32, torch.float64):
        return acc + 2.0**-24
    return acc + 4 * torch.finfo(out_dtype).eps


def _check(v: torch.Tensor, idx_long: torch.Tensor, exact: torch.Tensor, mag: torch.Tensor, T: int,
           impl: str) -> float:
    assert v.shape == idx_long.shape, f"{impl}: result of shape {tuple(v.shape)}, expected {tuple(idx_long.shape)}"
    assert torch.isfinite(v).all(), f"{impl}: non-finite values in the result"
    ref, scale = exact[idx_long], mag[idx_long]
    bound = _tolerance(T, v.dtype) * scale + 1e-30
    ratio = ((v.double() - ref).abs() / bound)
    worst = float(ratio.max()) if ratio.numel() else 0.0
    if worst > 1.0:
        j = int(ratio.argmax())
        raise AssertionError(f"{impl}: entry {j} (flat index {int(idx_long[j])}) is {float(v[j]):.6g}, the float64 "
                             f"product {float(ref[j]):.6g}: error {worst:.3g}x the bound {float(bound[j]):.3g}")
    return worst


def test_sampled_grad(benchmark, case, layers, opts):
    shape_set, shape, dtype_name, device, density, impl = case
    dtype = common.DTYPES[dtype_name]
    out_f, in_f = shape
    batch, seq = batch_size(shape_set, device), TOKENS[shape_set][shape]
    T = batch * seq
    grad_out, inp, exact, mag = layers.get(shape, T, device, dtype)
    idx = common.random_masks([shape], density)[0].to(device)
    idx_long = idx.long()
    n, k = out_f * in_f, idx.numel()
    elem = grad_out.element_size()
    backend = impl.split(":", 1)[1] if impl.startswith("fastmask:") else None
    info = benchmark.extra_info
    info.update(bench="sampled_grad", shape_set=shape_set, out_features=out_f, in_features=in_f, batch=batch,
                seq=seq, T=T, density=density, mask="random", impl=impl, backend=backend,
                kind="fastmask" if backend else "baseline", device=device, dtype=dtype_name, N=n, K=k,
                flops=2 * k * T if backend else 2 * n * T,
                own_bytes=(T * (out_f + in_f) * elem + k * 8) if backend
                else (T * (out_f + in_f) * elem + 2 * n * elem + k * (8 + elem)))
    ctx = fastmask.backends.use(backend) if backend else contextlib.nullcontext()
    if backend:
        def fn():
            return fastmask.ops.sampled_weight_grad(grad_out, inp, idx)
    else:
        def fn():
            return (grad_out.t() @ inp).view(-1)[idx_long]
    with ctx:
        v = fn()  # outside the timed region: a wrong result fails the case before it is timed
        common.sync(device)
        info["max_err_over_bound"] = _check(v, idx_long, exact, mag, T, impl)
        del v
        common.run_timed(benchmark, fn, device, opts.case_time)
    common.record_rate(benchmark, "flops", "gflops")
    common.record_rate(benchmark, "own_bytes", "gbps")
