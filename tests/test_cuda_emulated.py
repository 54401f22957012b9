"""The CUDA kernels (csrc/cuda/kernels.cu) and the binding's launch tables, run on the CPU.

No GPU runs here, so ``tests/cuda_emulation`` compiles kernels.cu as host C++ against a stand-in
``cuda_runtime.h`` that runs each launch's grid on CPU threads (a block's threads meet at
``__syncthreads``), and drives it through ``csrc/cuda/launch_tables.h``, the code ops_cuda.cpp
uses to split a call into launches and fill their tables. What this checks is the kernels' logic:
which entry each thread takes, the head peel that keeps vector loads aligned across launches,
the vector and scalar paths, per-tensor scalars computed only for a block's tensors, the index
check, fused score chunks, and the sampled weight gradient's row chunks (``csrc/cuda/sampled_grad.h``,
with a CPU product in place of cuBLAS's). The arithmetic is adamw_math.h's host branch (torch's CPU rounding),
so the results are compared with the reference on the CPU, as tests/test_ext.py compares the CPU
kernels: state and scores bit for bit, params within one rounding. The GPU's own rounding, memory
model and speed are scripts/gpu_check.sh's to check.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from fastmask import backends, ops
from tests.test_ext import _compare
from tests.utils import make_problem, random_indices

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in (torch.float32, torch.bfloat16, torch.float16)]


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    build = Path(os.environ.get("FASTMASK_CACHE_DIR", Path.home() / ".cache" / "fastmask")) / "cuda-emulation"
    build.mkdir(parents=True, exist_ok=True)
    return load("fastmask_cuda_emulated", [str(ROOT / "tests" / "cuda_emulation" / "harness.cpp")],
                extra_include_paths=[str(ROOT / "tests" / "cuda_emulation"), str(ROOT / "csrc")],
                extra_cflags=["-O1", "-std=c++17", "-ffp-contract=off"], build_directory=str(build))


def _run_emu(emu, pr, *, amsgrad=False, maximize=False, grad_scale=None, found_inf=None, scores=None, mode="grad",
             lr=1e-2, wd=0.1, betas=(0.9, 0.999), exp_avg=None):
    q = copy.deepcopy(pr)
    if exp_avg is not None:  # a differently placed (e.g. misaligned) buffer with the same values
        exp_avg.copy_(q.exp_avg)
        q.exp_avg = exp_avg
    sc = [s.clone() for s in scores] if scores is not None else []
    bad = emu.masked_adamw_step_(q.params, q.grads, q.idx, q.exp_avg, q.exp_avg_sq, q.offsets, q.steps,
                                 torch.tensor(lr, dtype=torch.float64), betas[0], betas[1], 1e-8, wd, maximize,
                                 q.max_exp_avg_sq if amsgrad else None, grad_scale, found_inf, sc, mode)
    return q, sc, bad


def _run_ref(pr, *, amsgrad=False, maximize=False, grad_scale=None, found_inf=None, scores=None, mode="grad",
             lr=1e-2, wd=0.1, betas=(0.9, 0.999)):
    q = copy.deepcopy(pr)
    sc = [s.clone() for s in scores] if scores is not None else None
    with backends.use("reference"):
        ops.masked_adamw_step_(q.params, q.grads, q.idx, q.exp_avg, q.exp_avg_sq, q.offsets, q.steps, lr, betas[0],
                               betas[1], 1e-8, wd, maximize, max_exp_avg_sq=q.max_exp_avg_sq if amsgrad else None,
                               grad_scale=grad_scale, found_inf=found_inf, scores=sc, score_mode=mode)
    return q, sc


def _many_shapes(n, seed):
    """n tensors of odd sizes whose entry counts put the second launch's first entry off a multiple of 4."""
    g = torch.Generator().manual_seed(seed)
    return [(int(torch.randint(1, 400, (), generator=g)),) for _ in range(n)]


SHAPES = {
    "mixed": [(7,), (100, 33), (0,), (1000,), (1,)],
    "one": [(1,)],
    "odd": [(4099,), (5,), (3, 3)],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.1, 1.0])
@pytest.mark.parametrize("shapes", list(SHAPES))
def test_step_matches_reference(emu, shapes, density, dtype):
    pr = make_problem(SHAPES[shapes], dtype=dtype, density=density, seed=1)
    got, _, bad = _run_emu(emu, pr)
    want, _ = _run_ref(pr)
    assert bad == 0
    _compare(pr, got, want, dtype, False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amsgrad,maximize,scaled", [(True, False, False), (False, True, True), (True, True, True)],
                         ids=["amsgrad", "maximize+gradscale", "all"])
def test_step_options(emu, dtype, amsgrad, maximize, scaled):
    pr = make_problem(SHAPES["mixed"] + [(3072, 7)], dtype=dtype, density=0.3, seed=2)
    kw = dict(amsgrad=amsgrad, maximize=maximize, grad_scale=torch.tensor(1024.0) if scaled else None, wd=0.05,
              lr=3e-3, betas=(0.95, 0.9999))
    got, _, bad = _run_emu(emu, pr, **kw)
    want, _ = _run_ref(pr, **kw)
    assert bad == 0
    _compare(pr, got, want, dtype, amsgrad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ops.SCORE_MODES)
def test_fused_scores(emu, dtype, mode):
    """Score blocks after the step blocks: full aligned chunks take the vector path, the last
    chunk of each tensor the scalar one."""
    pr = make_problem(SHAPES["mixed"] + [(2 * 4096 + 3,)], dtype=dtype, density=0.2, seed=3)
    scores = [torch.randn(p.shape) for p in pr.params]
    kw = dict(scores=scores, mode=mode, grad_scale=torch.tensor(4.0), maximize=True, amsgrad=True)
    got, sg, bad = _run_emu(emu, pr, **kw)
    want, sw = _run_ref(pr, **kw)
    assert bad == 0
    _compare(pr, got, want, dtype, True, sg, sw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_more_tensors_than_one_launch_with_a_head_peel(emu, dtype):
    """300 tensors: three launches of at most kMaxTensors (128 with CUDA >= 12.1), whose first
    entries are not multiples of 4; fused scores too."""
    shapes = _many_shapes(300, seed=7)
    pr = make_problem(shapes, dtype=dtype, density=0.37, seed=5)
    launches = [pr.offsets[i] for i in range(0, 300, emu.max_tensors)]
    assert len(launches) >= 3 and any(k % 4 for k in launches[1:]), launches
    scores = [torch.randn(p.shape) for p in pr.params]
    kw = dict(scores=scores, mode="fisher", amsgrad=True)
    got, sg, bad = _run_emu(emu, pr, **kw)
    want, sw = _run_ref(pr, **kw)
    assert bad == 0
    _compare(pr, got, want, dtype, True, sg, sw)


def test_misaligned_state_takes_the_scalar_path(emu):
    """exp_avg one float off a 16-byte boundary: no vector loads anywhere, same results."""
    pr = make_problem(SHAPES["mixed"] + [(3072, 7)], density=0.5, seed=9)
    buf = torch.empty(pr.exp_avg.numel() + 1)[1:]
    assert buf.data_ptr() % 16 != 0
    got, _, bad = _run_emu(emu, pr, exp_avg=buf, amsgrad=True)
    want, _ = _run_ref(pr, amsgrad=True)
    assert bad == 0
    _compare(pr, got, want, torch.float32, True)


def test_found_inf_skips_everything(emu):
    pr = make_problem(SHAPES["mixed"], density=0.5, seed=4)
    scores = [torch.randn(p.shape) for p in pr.params]
    got, sg, _ = _run_emu(emu, pr, found_inf=torch.tensor(1.0), scores=scores, amsgrad=True)
    for a, b in zip(got.params + sg + [got.exp_avg, got.exp_avg_sq], pr.params + scores + [pr.exp_avg, pr.exp_avg_sq]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["step", "step+scores"])
def test_out_of_range_indices_are_skipped_and_counted(emu, dtype, fused):
    """Indices past the end, far, -1 and INT32_MIN, in the first, a middle and the last tensor, in
    vector and scalar groups: counted, nothing read or written at them (their state unchanged), every
    other entry stepped as the reference steps it."""
    shapes = [(37, 11), (5,), (3000,), (64,)]
    pr = make_problem(shapes, dtype=dtype, density=0.4, seed=11)
    bad_at = {pr.offsets[0]: 37 * 11, pr.offsets[0] + 5: -1, pr.offsets[2] + 1: 2**31 - 1,
              pr.offsets[2] + 600: -(2**31), pr.offsets[4] - 1: 64}
    scores = [torch.randn(p.shape) for p in pr.params] if fused else None
    want, sw = _run_ref(pr, scores=scores, amsgrad=True)  # the reference steps the original indices
    poisoned = copy.deepcopy(pr)
    for j, v in bad_at.items():
        poisoned.idx[j] = v
    got, sg, bad = _run_emu(emu, poisoned, scores=scores, amsgrad=True)
    assert bad == len(bad_at)
    skipped = torch.zeros(pr.idx.numel(), dtype=torch.bool)
    skipped[list(bad_at)] = True
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        a, w, p0 = getattr(got, name), getattr(want, name), getattr(pr, name)
        assert torch.equal(a[~skipped], w[~skipped]), name
        assert torch.equal(a[skipped], p0[skipped]), f"{name}: a skipped entry's state changed"
    for t in range(len(shapes)):
        seg = slice(pr.offsets[t], pr.offsets[t + 1])
        untouched = pr.idx[seg][skipped[seg]].long()  # the original indices the poisoned entries replaced
        a, w, p0 = got.params[t].view(-1).clone(), want.params[t].view(-1).clone(), pr.params[t].view(-1)
        assert torch.equal(a[untouched], p0[untouched]), f"params[{t}]: written at a skipped entry"
        a[untouched] = w[untouched] = 0
        torch.testing.assert_close(a, w, rtol=2 * torch.finfo(dtype).eps, atol=0.0)
    for a, w in zip(sg, sw or []):
        assert torch.equal(a, w)  # scores are a dense pass: every gradient entry, whatever idx holds


@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ops.SCORE_MODES)
def test_score_accumulate(emu, gdtype, mode):
    """Full chunks (vector loads), partial last chunks, a misaligned gradient view (scalar path),
    empty tensors, and more tensors than one launch."""
    g = torch.Generator().manual_seed(13)
    shapes = [(2 * 4096 + 5,), (0,), (4096,), (3, 7)] + _many_shapes(140, seed=3)
    grads = [torch.randn(s, generator=g).to(gdtype) for s in shapes]
    base = torch.randn(4096 + 1, generator=g).to(gdtype)
    grads.append(base[1:])  # one element off its allocation: not aligned for vector loads
    scores = [torch.randn(t.shape, generator=g) for t in grads]
    got = [s.clone() for s in scores]
    emu.score_accumulate_(got, grads, mode)
    want = [s.clone() for s in scores]
    with backends.use("reference"):
        ops.score_accumulate_(want, grads, mode)
    for t, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"scores[{t}]"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tile", [1, 17, 40, 17 * 29, 10**6], ids=lambda t: f"tile{t}")
@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_sampled_weight_grad_row_chunks(emu, dtype, tile, order):
    """The binding's sampled weight gradient gathers from row chunks of the product (one row per
    chunk, two, all of them in one): every selected entry from its own chunk, in any index order."""
    from tests.test_sampled_grads import _bound

    g = torch.Generator().manual_seed(17)
    T, n_out, n_in = 33, 29, 17
    grad_out = torch.randn(T, n_out, generator=g).to(dtype)
    x = torch.randn(T, n_in, generator=g).to(dtype)
    idx = random_indices(n_out * n_in, 150, g)
    if order == "shuffled":
        idx = idx[torch.randperm(idx.numel(), generator=g)]
    got = emu.sampled_weight_grad(grad_out, x, idx, tile)
    want = (grad_out.double().t() @ x.double()).reshape(-1)[idx.long()]
    assert got.dtype == torch.float32 and got.shape == idx.shape
    assert bool(((got.double() - want).abs() <= _bound(grad_out, x, idx, dtype)).all())

