"""The Triton backend against the reference backend.

Every case runs the same problem (cloned) through ``backends.use("reference")`` and
``backends.use("triton")`` and compares: optimizer state and scores bit for bit, params within
``STEP_TOL`` of their dtype and within one rounding of the reference's step (torch's CPU ``sqrt``
is not correctly rounded; the kernels' is), unselected entries bit-exact. Without a GPU the
kernels run in Triton's interpreter on CPU tensors (conftest sets ``TRITON_INTERPRET=1``), so sizes
stay small; the cases marked ``gpu_only`` (CUDA graphs, streams, host syncs, 2^31-entry tensors)
run where a GPU is.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

try:
    import triton
    import triton.language as tl
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton cannot be imported ({type(exc).__name__}: {exc}); the Triton backend is untestable here",
                allow_module_level=True)

import fastmask
from fastmask import backends, ops

from .utils import (
    BAD_INDEX_VALUES, STEP_TOL, assert_close, assert_steps_never_sync_the_host, make_problem, poisoned_problem,
    random_indices, tol,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_reason = backends.why_not("triton", DEVICE)
if _reason is not None:  # pragma: no cover
    pytest.skip(f"triton backend cannot run on {DEVICE}: {_reason}", allow_module_level=True)
backends.load("triton")
from fastmask.kernels import _utils as _kutils  # noqa: E402

DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPES = [pytest.param(d, id=i) for d, i in DTYPE_IDS.items()]
SHAPES = {
    "one-1": [(1,)],
    "odd-7": [(7,)],
    # several shapes in one launch, with an empty tensor in the middle and more than one
    # program per tensor (the interpreter's dense block is 4096 entries)
    "mixed": [(7,), (37, 129), (0,), (1,), (3, 5, 11), (64, 300)],
}
SHAPE_PARAMS = [pytest.param(v, id=k) for k, v in SHAPES.items()]
DENSITIES = [pytest.param(d, id=f"density-{d}") for d in (0.0, 0.1, 1.0)]
MODES = [pytest.param(m, id=m) for m in ops.SCORE_MODES]


def _kernel_module():
    backends.load("triton")
    return sys.modules["fastmask.kernels.masked_adamw"]


def _on_device(problem):
    problem = copy.deepcopy(problem)  # utils.Problem.clone() cannot clone its offsets list
    for name in ("params", "grads"):
        setattr(problem, name, [t.to(DEVICE) for t in getattr(problem, name)])
    for name in ("idx", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "steps"):
        setattr(problem, name, getattr(problem, name).to(DEVICE))
    return problem


def _random_scores(shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(DEVICE) for s in shapes]


def _run(backend, problem, *, lr=None, amsgrad=False, maximize=False, weight_decay=1e-2,
         grad_scale=None, found_inf=None, scores=None, score_mode="grad", betas=(0.9, 0.999)):
    """Apply one step with ``backend`` to a copy of ``problem``; return (problem, scores) after."""
    q = _on_device(problem)
    scores = [s.clone() for s in scores] if scores else []
    if lr is None:
        lr = torch.tensor(1e-2, dtype=torch.float64)
    with backends.use(backend):
        ops.masked_adamw_step_(
            q.params, q.grads, q.idx, q.exp_avg, q.exp_avg_sq, q.offsets, q.steps, lr,
            betas[0], betas[1], 1e-8, weight_decay, maximize,
            max_exp_avg_sq=q.max_exp_avg_sq if amsgrad else None,
            grad_scale=grad_scale, found_inf=found_inf, scores=scores, score_mode=score_mode,
        )
    return q, scores


def _unselected(problem, t):
    keep = torch.ones(problem.params[t].numel(), dtype=torch.bool)
    keep[problem.idx[problem.offsets[t]:problem.offsets[t + 1]].long().cpu()] = False
    return keep


def _assert_equal(actual, expected, what):
    """Bit for bit (NaN where the other has NaN): the optimizer state and scores."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    nan = a.isnan()
    same = torch.equal(nan, e.isnan()) and torch.equal(a[~nan], e[~nan])
    if not same:
        bad = ((a != e) & ~(nan & e.isnan())).reshape(-1).nonzero().squeeze(1)
        rows = "\n".join(f"  [{i}] actual={a.reshape(-1)[i].item()!r} expected={e.reshape(-1)[i].item()!r}"
                         for i in bad[:10].tolist())
        raise AssertionError(f"{what}: {bad.numel()} of {a.numel()} entries differ from the reference\n{rows}")


def _assert_rounding_close(actual, expected, before, what):
    """One step differs from the reference's by rounding only: the update may be an fp32 ulp off
    (torch's CPU sqrt) and the result one rounding to its dtype. A bound in ulps of the parameter
    would be wrong where ``p * decay`` and the update cancel."""
    a, b, p0 = (x.detach().cpu().float().reshape(-1) for x in (actual, expected, before))
    nan = a.isnan()
    assert torch.equal(nan, b.isnan()), f"{what}: NaN at other entries than the reference's"
    bound = torch.finfo(actual.dtype).eps * b.abs() + 2 * torch.finfo(torch.float32).eps * (p0.abs() + (b - p0).abs())
    bad = ((a - b).abs() > bound) & ~nan
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} entries beyond rounding of the reference's step"


def _compare(before, ref, out, dtype, *, amsgrad=False, ref_scores=(), out_scores=()):
    for t, (p0, pr, po) in enumerate(zip(before.params, ref.params, out.params)):
        _assert_rounding_close(po, pr, p0, f"params[{t}] {tuple(p0.shape)}")  # NaN where the reference's
        finite = ~pr.cpu().isnan()
        assert_close(po.cpu()[finite], pr.cpu()[finite], **tol(dtype), what=f"params[{t}] {tuple(p0.shape)}")
        keep = _unselected(before, t)
        # unselected entries: not a single bit may change
        assert torch.equal(po.cpu().reshape(-1)[keep].view(torch.uint8 if dtype == torch.float32 else dtype),
                           p0.reshape(-1)[keep].view(torch.uint8 if dtype == torch.float32 else dtype)), \
            f"params[{t}]: an unselected entry changed"
    for t, (g0, go) in enumerate(zip(before.grads, out.grads)):
        assert torch.equal(_bits(go), _bits(g0)), f"grads[{t}] was written"
    _assert_equal(out.exp_avg, ref.exp_avg, "exp_avg")
    _assert_equal(out.exp_avg_sq, ref.exp_avg_sq, "exp_avg_sq")
    if amsgrad:
        _assert_equal(out.max_exp_avg_sq, ref.max_exp_avg_sq, "max_exp_avg_sq")
    else:
        assert torch.equal(out.max_exp_avg_sq.cpu(), before.max_exp_avg_sq.cpu()), \
            "max_exp_avg_sq written without amsgrad"
    for t, (sr, so) in enumerate(zip(ref_scores, out_scores)):
        _assert_equal(so, sr, f"scores[{t}]")


def _both(problem, dtype, **kw):
    ref, ref_scores = _run("reference", problem, **kw)
    out, out_scores = _run("triton", problem, **kw)
    _compare(problem, ref, out, dtype, amsgrad=kw.get("amsgrad", False), ref_scores=ref_scores, out_scores=out_scores)
    return ref, out


# ---------------------------------------------------------------------------------------------
# masked_adamw_step_
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shapes", SHAPE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_matches_reference(dtype, shapes, density):
    problem = make_problem(shapes, dtype=dtype, density=density, seed=3)
    ref, out = _both(problem, dtype)
    if problem.idx.numel():  # the step did something (guards against a kernel that never runs)
        assert not torch.equal(out.exp_avg.cpu(), problem.exp_avg)


OPTIONS = {
    "amsgrad": dict(amsgrad=True),
    "maximize": dict(maximize=True),
    "no-weight-decay": dict(weight_decay=0.0),
    "big-weight-decay": dict(weight_decay=0.5),
    "grad-scale": dict(grad_scale=torch.tensor(1024.0)),
    "found-inf-zero": dict(found_inf=torch.tensor(0.0), grad_scale=torch.tensor(8.0)),
    "beta1-above-half": dict(betas=(0.3, 0.99)),
    "beta-zero": dict(betas=(0.0, 0.0)),
    "all": dict(amsgrad=True, maximize=True, weight_decay=0.1, grad_scale=torch.tensor(4.0),
                found_inf=torch.tensor(0.0)),
}


@pytest.mark.parametrize("opts", [pytest.param(v, id=k) for k, v in OPTIONS.items()])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_step_options(dtype, opts):
    opts = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    problem = make_problem(SHAPES["mixed"], dtype=dtype, density=0.3, seed=5)
    _both(problem, dtype, **opts)


@pytest.mark.parametrize("step", [1, 2, 1000, 100000])
def test_step_bias_correction_steps(step):
    """Bias corrections at step 1 (1 - beta2 = 1e-3: where a naive fp32 pow loses digits) to large."""
    problem = make_problem([(5, 40)], density=0.5, seed=7, step=step)
    ref, out = _both(problem, torch.float32, lr=torch.tensor(1.0, dtype=torch.float64), weight_decay=0.0)
    # With lr = 1 the update is as large as the param, so compare the updates themselves: an
    # error in 1 - beta**step shows up here, where the param's magnitude would hide it.
    before = problem.params[0]
    assert_close(out.params[0].cpu() - before, ref.params[0].cpu() - before, rtol=4e-6, atol=3e-7,
                 what="update")


@pytest.mark.parametrize("lr_kind", ["cpu-float64", "cpu-float32", "in-kernel-float64", "in-kernel-float32"])
def test_step_lr_tensor(lr_kind, monkeypatch):
    """lr read on the host (CPU tensor) or loaded by the kernel (device tensor).

    Without a GPU the CPU lr would always take the host path: the in-kernel cases force the
    device path, so the kernel's own load of lr is what is tested."""
    dtype = torch.float64 if lr_kind.endswith("64") else torch.float32
    if lr_kind.startswith("in-kernel"):
        monkeypatch.setattr(_kernel_module(), "_lr_on_host", lambda lr: False)
        lr = torch.tensor(3e-3, dtype=dtype, device=DEVICE)
    else:
        lr = torch.tensor(3e-3, dtype=dtype)
    problem = make_problem(SHAPES["mixed"], density=0.2, seed=11)
    _both(problem, torch.float32, lr=lr)


@pytest.mark.parametrize("fused", [pytest.param(False, id="step-only"), pytest.param(True, id="fused-scores")])
@pytest.mark.parametrize("amsgrad", [pytest.param(False, id="adam"), pytest.param(True, id="amsgrad")])
def test_found_inf_skips_everything(amsgrad, fused):
    problem = make_problem(SHAPES["mixed"], dtype=torch.bfloat16, density=0.3, seed=13)
    scores = _random_scores(SHAPES["mixed"]) if fused else None
    out, out_scores = _run("triton", problem, amsgrad=amsgrad, grad_scale=torch.tensor(2.0, device=DEVICE),
                           found_inf=torch.tensor(1.0, device=DEVICE), scores=scores, score_mode="fisher")
    for t, (p0, p) in enumerate(zip(problem.params, out.params)):
        assert torch.equal(p.cpu(), p0), f"params[{t}] changed on a skipped step"
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "steps"):
        assert torch.equal(getattr(out, name).cpu(), getattr(problem, name)), f"{name} changed on a skipped step"
    for t, (s0, s) in enumerate(zip(scores or [], out_scores)):
        assert torch.equal(s, s0), f"scores[{t}] changed on a skipped step"


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_fused_scores(dtype, mode, density):
    """Scores (poisoned with random values) get every entry's statistic; the step is unchanged."""
    shapes = SHAPES["mixed"]
    problem = make_problem(shapes, dtype=dtype, density=density, seed=17)
    _both(problem, dtype, scores=_random_scores(shapes), score_mode=mode,
          grad_scale=torch.tensor(2.0, device=DEVICE), maximize=True)


@pytest.mark.parametrize("fused", [pytest.param(False, id="step-only"), pytest.param(True, id="fused-scores")])
def test_step_many_tensors(fused):
    """40 tensors (more than one 16-wide search vector), some empty, in one launch."""
    g = torch.Generator().manual_seed(53)
    shapes = [(int(n),) for n in torch.randint(0, 300, (40,), generator=g)] + [(0,), (5000,)]
    problem = make_problem(shapes, dtype=torch.float16, density=0.5, seed=59)
    _both(problem, torch.float16, scores=_random_scores(shapes) if fused else None, score_mode="fisher")


def test_step_large_tensor():
    """One tensor of 1000003 entries (prime: no block divides it) beside small ones, fused scoring."""
    shapes = [(1000003,), (7,), (1,)]
    problem = make_problem(shapes, density=0.1, seed=19)
    _both(problem, torch.float32, scores=_random_scores(shapes), score_mode="abs", amsgrad=True)


def test_step_is_one_launch(monkeypatch):
    """All tensors of a call go through a single kernel launch."""
    mod = _kernel_module()
    launches = []
    kernel = mod._masked_adamw_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(mod, "_masked_adamw_kernel", Counting())
    problem = make_problem(SHAPES["mixed"], density=0.1, seed=23)
    _run("triton", problem)
    _run("triton", problem, scores=_random_scores(SHAPES["mixed"]))
    assert len(launches) == 2, launches


def test_step_nothing_selected_no_scores_is_a_no_op():
    problem = make_problem(SHAPES["mixed"], density=0.0, seed=29)
    out, _ = _run("triton", problem)
    for p0, p in zip(problem.params, out.params):
        assert torch.equal(p.cpu(), p0)


# ---------------------------------------------------------------------------------------------
# exactness: the reference's roundings, step after step, for any betas
# ---------------------------------------------------------------------------------------------
BETAS = [pytest.param(b, id=f"betas-{b[0]}-{b[1]}") for b in
         [(0.9, 0.999), (0.95, 0.9999), (0.0, 0.5), (0.999, 0.99999)]]
TRAJECTORY_STEPS = 20


def _ext_or_none():
    reason = backends.why_not("ext", DEVICE)
    return None if reason is not None else "ext"


def _trajectory_problem(dtype, seed):
    # a tensor of several programs, odd sizes, grads that change sign and scale over the steps
    return _on_device(make_problem([(37, 129), (7,), (5000,), (1,)], dtype=dtype, density=0.3, seed=seed, step=0))


_ALL = dict(amsgrad=True, maximize=True, grad_scale=2.0, fused="fisher")


@pytest.mark.parametrize("dtype,opts", [
    pytest.param(torch.float32, dict(), id="fp32-adamw"),
    pytest.param(torch.float32, _ALL, id="fp32-amsgrad-max-scale-scores"),
    pytest.param(torch.bfloat16, _ALL, id="bf16-amsgrad-max-scale-scores"),
])
@pytest.mark.parametrize("betas", BETAS)
def test_trajectory_bit_identical_state(betas, dtype, opts):
    """Betas close to 1 (where ``1 - beta2`` or a bias correction computed in fp32 is off by
    1e-4 relative), many steps: at every step the state and scores equal the reference's bit for
    bit and the params are within one rounding of the reference's step, starting each step from the
    Triton run's own state. Where the compiled extension is available on the device (IEEE sqrt, the
    same FMAs), the params equal its params bit for bit as well."""
    q = _trajectory_problem(dtype, seed=91)
    gen = torch.Generator().manual_seed(93)
    lr = torch.tensor(1e-3, dtype=torch.float64)  # 1e-3 is not an fp32 value: lr must stay float64
    scores = _random_scores([p.shape for p in q.params], seed=95) if opts.get("fused") else []
    twin = _ext_or_none()
    for step in range(TRAJECTORY_STEPS):
        q.steps += 1
        for g in q.grads:  # new gradients each step, of varying scale (some steps tiny, some large)
            g.copy_((torch.randn(g.shape, generator=gen) * 10.0 ** float(torch.randint(-4, 3, (), generator=gen)))
                    .to(device=DEVICE, dtype=dtype))
        kw = dict(lr=lr, betas=betas, weight_decay=0.1, amsgrad=opts.get("amsgrad", False),
                  maximize=opts.get("maximize", False), scores=scores, score_mode=opts.get("fused", "grad"),
                  grad_scale=torch.tensor(opts["grad_scale"], device=DEVICE) if "grad_scale" in opts else None)
        ref, ref_scores = _run("reference", q, **kw)
        out, out_scores = _run("triton", q, **kw)
        try:
            _compare(q, ref, out, dtype, amsgrad=kw["amsgrad"], ref_scores=ref_scores, out_scores=out_scores)
            if twin:
                ext, ext_scores = _run(twin, q, **kw)
                for t, (a, b) in enumerate(zip(out.params, ext.params)):
                    assert torch.equal(a, b), f"params[{t}] differ from the compiled extension's"
                for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    assert torch.equal(getattr(out, name), getattr(ext, name)), f"{name} differs from the extension's"
        except AssertionError as exc:
            raise AssertionError(f"step {step + 1}: {exc}") from None
        q, scores = out, out_scores


@pytest.mark.parametrize("fused", [pytest.param(False, id="step-only"), pytest.param(True, id="fused-scores")])
def test_nan_and_inf_propagate_like_torch(fused):
    """NaN in max_exp_avg_sq (amsgrad's torch.maximum keeps it), NaN and inf in gradients and
    state: the same entries become NaN/inf as in the reference, the others are unaffected."""
    problem = make_problem([(37, 129), (7,)], density=0.5, seed=97)
    k0 = problem.offsets[1]
    sel0 = problem.idx[:k0].long()
    problem.max_exp_avg_sq[:5] = float("nan")
    problem.exp_avg_sq[5:8] = float("nan")
    problem.exp_avg[8:10] = float("inf")
    problem.grads[0].view(-1)[sel0[10:13]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    problem.grads[1].view(-1)[0] = float("nan")  # unselected or not: scores see it either way
    scores = _random_scores([(37, 129), (7,)], seed=99) if fused else None
    _both(problem, torch.float32, amsgrad=True, scores=scores, score_mode="fisher")


def test_launches_disable_fp_contraction(monkeypatch):
    """Both kernels are launched with ``enable_fp_fusion=False``: Triton would otherwise contract
    ``p * decay + update`` and ``score + g * g`` into FMAs that torch does not use."""
    seen = []
    for name, attr in (("fastmask.kernels.masked_adamw", "_masked_adamw_kernel"),
                       ("fastmask.kernels.score_accumulate", "_score_accumulate_kernel")):
        backends.load("triton")
        mod = sys.modules[name]
        kernel = getattr(mod, attr)

        class Recording:
            def __getitem__(self, grid, kernel=kernel, attr=attr):
                def launch(*args, **kwargs):
                    seen.append((attr, kwargs.get("enable_fp_fusion")))
                    return kernel[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(mod, attr, Recording())
    problem = make_problem(SHAPES["mixed"], density=0.2, seed=101)
    _run("triton", problem, scores=_random_scores(SHAPES["mixed"]), score_mode="fisher")
    g = [torch.randn(5, 3, device=DEVICE)]
    with backends.use("triton"):
        fastmask.ops.score_accumulate_([torch.zeros(5, 3, device=DEVICE)], g, "fisher")
    assert seen == [("_masked_adamw_kernel", False), ("_score_accumulate_kernel", False)], seen


@triton.jit
def _echo_f64(out_ptr, bits, n: tl.constexpr):
    tl.store(out_ptr + n, _kutils.as_f64(bits))


def test_float64_scalars_reach_the_kernel_exactly():
    """Scalars travel as their IEEE bits (Triton would pass a Python float as fp32)."""
    values = [0.0, -0.0, 1e-3, 0.9999, 1 - 2**-40, 5e-324, 1e300, -2.5, float("inf")]
    out = torch.zeros(len(values), dtype=torch.float64, device=DEVICE)
    for n, v in enumerate(values):
        with _kutils.launch_context(out.device):
            _echo_f64[(1,)](out, _kutils.f64_bits(v), n)
    got = out.cpu().tolist()
    assert [x.hex() for x in got] == [float(v).hex() for v in values], got
    expected = torch.tensor(1 - 0.9999, dtype=torch.float64).float().view(torch.int32).item()
    assert _kutils.f32_bits(1 - 0.9999) == expected


# ---------------------------------------------------------------------------------------------
# score_accumulate_
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES + [pytest.param(torch.float64, id="fp64")])
def test_score_accumulate(dtype, mode):
    shapes = SHAPES["mixed"]
    g = torch.Generator().manual_seed(31)
    grads = [torch.randn(s, generator=g).to(device=DEVICE, dtype=dtype) for s in shapes]
    start = _random_scores(shapes, seed=37)
    results = {}
    for backend in ("reference", "triton"):
        scores = [s.clone() for s in start]
        with backends.use(backend):
            fastmask.ops.score_accumulate_(scores, grads, mode)
        results[backend] = scores
    for t, (r, o) in enumerate(zip(results["reference"], results["triton"])):
        _assert_equal(o, r, f"scores[{t}]")
        if r.numel():
            assert not torch.equal(o, start[t]), f"scores[{t}] unchanged"


def test_score_accumulate_mixed_dtypes():
    """Gradients of different dtypes in one call (one launch per dtype)."""
    shapes = [(9, 13), (5000,), (0, 3)]
    dtypes = [torch.float16, torch.float32, torch.bfloat16]
    g = torch.Generator().manual_seed(41)
    grads = [torch.randn(s, generator=g).to(device=DEVICE, dtype=d) for s, d in zip(shapes, dtypes)]
    start = _random_scores(shapes, seed=43)
    ref, out = [s.clone() for s in start], [s.clone() for s in start]
    with backends.use("reference"):
        fastmask.ops.score_accumulate_(ref, grads, "fisher")
    with backends.use("triton"):
        fastmask.ops.score_accumulate_(out, grads, "fisher")
    for t, (r, o) in enumerate(zip(ref, out)):
        _assert_equal(o, r, f"scores[{t}]")


# ---------------------------------------------------------------------------------------------
# MaskedAdamW through the triton backend
# ---------------------------------------------------------------------------------------------
def _train(backend, dtype, *, steps=50, lr=None, track_scores=None, amsgrad=False, maximize=False):
    g = torch.Generator().manual_seed(47)
    shapes = [(33, 17), (7,), (4, 250), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device=DEVICE, dtype=dtype)) for s in shapes]
    dense = torch.nn.Parameter(torch.randn(5, 3, generator=g).to(device=DEVICE, dtype=dtype))
    masks = {p: random_indices(p.numel(), max(1, p.numel() // 10), g) for p in params}
    initial = [p.detach().clone() for p in params]
    opt = fastmask.optim.MaskedAdamW(
        [{"params": params}, {"params": [dense], "weight_decay": 0.0}],
        lr=1e-2 if lr is None else lr, weight_decay=0.05, amsgrad=amsgrad, maximize=maximize, masks=masks,
        track_scores=track_scores,
    )
    with backends.use(backend):
        for _ in range(steps):
            for p in params + [dense]:
                p.grad = torch.randn(p.shape, generator=g).to(device=DEVICE, dtype=dtype)
            opt.step()
    return params, initial, masks, opt


@pytest.mark.parametrize("variant", [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(amsgrad=True, maximize=True, track_scores="fisher"), id="amsgrad-maximize-scores"),
    pytest.param(dict(lr="tensor", track_scores="grad"), id="tensor-lr-scores"),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_adamw_50_steps(dtype, variant):
    variant = dict(variant)
    if variant.get("lr") == "tensor":
        variant["lr"] = torch.tensor(1e-2, device=DEVICE)
    ref_params, initial, ref_masks, ref_opt = _train("reference", dtype, **variant)
    out_params, _, out_masks, out_opt = _train("triton", dtype, **variant)
    for t, (r, o, p0, m) in enumerate(zip(ref_params, out_params, initial, ref_masks.values())):
        assert_close(o.detach().cpu(), r.detach().cpu(), **tol(dtype), what=f"param {t} after 50 steps")
        keep = torch.ones(p0.numel(), dtype=torch.bool)
        keep[m.long()] = False
        assert torch.equal(o.detach().cpu().reshape(-1)[keep], p0.cpu().reshape(-1)[keep]), \
            f"param {t}: unselected entries changed"
        assert not torch.equal(o.detach().cpu(), p0.cpu()), f"param {t} never changed"
    for rp, op in zip(ref_params, out_params):
        rs, os_ = ref_opt.state[rp], out_opt.state[op]
        _assert_equal(os_["exp_avg"], rs["exp_avg"], "exp_avg")
        _assert_equal(os_["exp_avg_sq"], rs["exp_avg_sq"], "exp_avg_sq")
        assert torch.equal(os_["step"].cpu(), rs["step"].cpu())
    if variant.get("track_scores"):
        for rp, op in zip(ref_params, out_params):
            _assert_equal(out_opt.state[op]["scores"], ref_opt.state[rp]["scores"], "tracked scores")


# ---------------------------------------------------------------------------------------------
# index safety: the kernel checks every index it uses (fastmask.ops' check is cached per version
# of the index buffer, and the backend function can be called directly)
# ---------------------------------------------------------------------------------------------
GUARD = 515  # entries of poisoned memory before, between and after the params
BAD_SHAPES = [(37, 129), (7,), (9000,)]  # the last one: several programs, fused or not
BAD_VALUES = BAD_INDEX_VALUES


def _poisoned_problem(dtype, seed=61):
    return poisoned_problem(BAD_SHAPES, dtype, density=0.3, seed=seed, guard=GUARD, device=DEVICE)


# On a GPU an out-of-range index fails a device-side assertion (torch._assert_async), which ends
# the process's CUDA context: these cases run on the CPU (interpreter) only.
cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the error is a device-side assertion")


def _kernel_step(params, grads, idx, m, v, offsets, steps, vm, scores, mode):
    backends.load("triton").masked_adamw_step_(
        params, grads, idx, m, v, offsets, steps, torch.tensor(1e-2, dtype=torch.float64), 0.9, 0.999, 1e-8, 0.1,
        False, vm, None, None, scores, mode)


def _bits(x):
    return x.cpu().view(torch.int32 if x.dtype == torch.float32 else torch.int16)


def _with_bad_indices(dtype, kind, placement, where, fused, amsgrad):
    pr, pbuf, gbuf, inside = _poisoned_problem(dtype)
    lo, hi = pr.offsets[where], pr.offsets[where + 1]
    numel = pr.params[where].numel()
    values = BAD_VALUES[kind](numel)
    if placement == "middle":
        at = (lo + hi) // 2 + torch.arange(3)
    elif values[0] < 0:
        at = lo + torch.arange(3)  # where sorting puts them
    else:
        at = hi - 3 + torch.arange(3)
    idx = pr.idx.clone()
    idx[at.to(DEVICE)] = torch.tensor(values, dtype=torch.int32, device=DEVICE)
    keep = torch.ones(idx.numel(), dtype=torch.bool)
    keep[at] = False
    scores0 = _random_scores(BAD_SHAPES, seed=67) if fused else []
    return pr, pbuf, gbuf, inside, idx, keep, values, scores0, "fisher" if fused else "grad"


def _assert_untouched(pr, pbuf, pbuf0, gbuf, gbuf0, inside, keep, m, v, vm):
    assert torch.equal(_bits(pbuf)[~inside], _bits(pbuf0)[~inside]), "memory outside the params was written"
    assert torch.equal(_bits(gbuf), _bits(gbuf0)), "grads were written"
    bad = ~keep.to(m.device)
    assert torch.equal(m[bad], pr.exp_avg[bad]) and torch.equal(v[bad], pr.exp_avg_sq[bad]), "bad entries' state"
    if vm is not None:
        assert torch.equal(vm[bad], pr.max_exp_avg_sq[bad]), "bad entries' max_exp_avg_sq"


@cpu_only
@pytest.mark.parametrize("amsgrad", [pytest.param(False, id="adam"), pytest.param(True, id="amsgrad")])
@pytest.mark.parametrize("fused", [pytest.param(False, id="step-only"), pytest.param(True, id="fused-scores")])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("where", [pytest.param(0, id="first-tensor"), pytest.param(2, id="last-tensor")])
@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_out_of_range_indices_never_touch_memory(kind, where, dtype, fused, amsgrad):
    """Three out-of-range indices in one tensor (where sorting puts them; in the middle, unsorted, too
    without scores), the kernel called directly: IndexError naming idx, nothing outside the params
    written, nothing at the bad entries, every other entry stepped exactly as without them."""
    for placement in ("sorted",) if fused else ("sorted", "middle"):
        pr, pbuf, gbuf, inside, idx, keep, values, scores0, mode = _with_bad_indices(
            dtype, kind, placement, where, fused, amsgrad)
        pbuf0, gbuf0 = pbuf.clone(), gbuf.clone()
        m, v = pr.exp_avg.clone(), pr.exp_avg_sq.clone()
        vm = pr.max_exp_avg_sq.clone() if amsgrad else None
        scores = [s.clone() for s in scores0]
        numel = pr.params[where].numel()
        with pytest.raises(IndexError, match=rf"^idx: 3 indices of tensor {where} are outside \[0, {numel}\) "
                                             rf"\(first: {values[0]}\);"):
            _kernel_step(pr.params, pr.grads, idx, m, v, pr.offsets, pr.steps, vm, scores, mode)
        _assert_untouched(pr, pbuf, pbuf0, gbuf, gbuf0, inside, keep, m, v, vm)

        # the valid entries: exactly as a step over them alone
        kd = keep.to(DEVICE)
        offsets = [int(keep[:o].sum()) for o in pr.offsets]
        params = [p.clone() for p in _poisoned_problem(dtype)[0].params]
        mc, vc = pr.exp_avg[kd].clone(), pr.exp_avg_sq[kd].clone()
        vmc = pr.max_exp_avg_sq[kd].clone() if amsgrad else None
        sc = [s.clone() for s in scores0]
        _kernel_step(params, [g.clone() for g in pr.grads], idx[kd].clone(), mc, vc, offsets, pr.steps, vmc, sc,
                     mode)
        for t, (a, b) in enumerate(zip(pr.params, params)):
            assert torch.equal(_bits(a), _bits(b)), f"params[{t}] differ from a step without the bad entries"
        assert torch.equal(m[kd], mc) and torch.equal(v[kd], vc)
        if amsgrad:
            assert torch.equal(vm[kd], vmc)
        for t, (a, b) in enumerate(zip(scores, sc)):
            assert torch.equal(a, b), f"scores[{t}] differ"


@cpu_only
@pytest.mark.parametrize("kind", ["far", "int32-min"])
def test_unsorted_bad_indices_fused_stay_in_bounds(kind):
    """Unsorted garbage in the fused variant (its bisections assume sorted segments): some
    entries may go unvisited, but nothing outside the tensors is read or written."""
    pr, pbuf, gbuf, inside, idx, keep, values, scores0, mode = _with_bad_indices(
        torch.float32, kind, "middle", 2, True, True)
    idx[pr.offsets[0]:pr.offsets[1]] = idx[pr.offsets[0]:pr.offsets[1]].flip(0)  # tensor 0 unsorted too
    pbuf0, gbuf0 = pbuf.clone(), gbuf.clone()
    m, v, vm = pr.exp_avg.clone(), pr.exp_avg_sq.clone(), pr.max_exp_avg_sq.clone()
    try:
        _kernel_step(pr.params, pr.grads, idx, m, v, pr.offsets, pr.steps, vm, [s.clone() for s in scores0], mode)
    except IndexError as exc:
        assert str(exc).startswith("idx: ")
    _assert_untouched(pr, pbuf, pbuf0, gbuf, gbuf0, inside, keep, m, v, vm)


@cpu_only
@pytest.mark.parametrize("how", ["data", "numpy"])
@pytest.mark.parametrize("track", [None, "abs"])
def test_index_write_without_version_bump_raises(track, how):
    """A write to a mask that does not bump the index buffer's version (fastmask.ops' cached check
    cannot see it) reaches the kernel, which skips the bad entry and raises; the neighbour sharing
    the storage is not written."""
    gen = torch.Generator().manual_seed(71)
    base = torch.randn(64 + 200, generator=gen).to(DEVICE)
    a = torch.nn.Parameter(base[:64].view(8, 8))
    b = torch.nn.Parameter(base[64:])
    a_sel = [1, 5, 9, 30, 60]
    b_sel = torch.cat([torch.arange(0, 3), torch.arange(4, 200, 4)]).to(torch.int32)  # not b's entry 3
    opt = fastmask.optim.MaskedAdamW([a, b], lr=1e-2, weight_decay=0.1, track_scores=track,
                                     masks={a: torch.tensor(a_sel), b: b_sel})

    def step():
        a.grad = torch.randn(a.shape, generator=gen).to(DEVICE)
        b.grad = torch.randn(b.shape, generator=gen).to(DEVICE)
        opt.step()

    with backends.use("triton"):
        step()
        idx = opt.masks[a]
        version = idx._version
        if how == "data":
            idx.data[-1] = 64 + 3  # b's entry 3, which b's mask does not select
        else:
            idx.numpy()[-1] = 64 + 3
        assert idx._version == version and int(idx[-1]) == 67  # the cached check cannot see it
        a_before, b_before = a.detach().clone(), b.detach().clone()
        with pytest.raises(IndexError, match=r"idx: 1 index of tensor 0 is outside \[0, 64\) \(first: 67\)"):
            step()
    b_unselected = torch.ones(200, dtype=torch.bool)
    b_unselected[b_sel.long()] = False
    assert torch.equal(b.detach()[b_unselected], b_before[b_unselected]), "the neighbouring param was written"
    a_unselected = torch.ones(64, dtype=torch.bool)
    a_unselected[a_sel] = False
    a_unselected[60] = True  # replaced by the bad index: not stepped
    assert torch.equal(a.detach().view(-1)[a_unselected], a_before.view(-1)[a_unselected])


# ---------------------------------------------------------------------------------------------
# the fused step's per-program ranges (bisected once per mask, cached per index buffer version)
# and the plain step's unmasked (vector) programs
# ---------------------------------------------------------------------------------------------
RANGE_SHAPES = [(7,), (3, 5000), (0,), (1,), (9000,), (4096,)]  # several programs per tensor (block 4096 on the CPU)


def _count_ranges(monkeypatch):
    """Record every computation of the fused ranges (``_fused_ranges``' results)."""
    mod = _kernel_module()
    made, real = [], mod._fused_ranges
    monkeypatch.setattr(mod, "_fused_ranges", lambda *a: made.append(real(*a)) or made[-1])
    return made


def _ops_step(q, idx=None, scores=(), mode="abs", amsgrad=True):
    ops.masked_adamw_step_(q.params, q.grads, q.idx if idx is None else idx, q.exp_avg, q.exp_avg_sq, q.offsets,
                           q.steps, torch.tensor(1e-2, dtype=torch.float64), 0.9, 0.999, 1e-8, 0.1, False,
                           max_exp_avg_sq=q.max_exp_avg_sq if amsgrad else None, scores=list(scores), score_mode=mode)


def _expected_ranges(idx, problem):
    block = _kutils.dense_block(torch.device(DEVICE))
    expected = []
    for t, p in enumerate(problem.params):
        lo, hi = problem.offsets[t], problem.offsets[t + 1]
        starts = torch.arange(0, p.numel(), block, dtype=torch.int64)
        found = torch.searchsorted(idx[lo:hi].cpu().long(), starts) + lo
        expected += [lo] + found[1:].tolist() if starts.numel() else []
    return expected


def test_fused_ranges_are_each_blocks_first_entry(monkeypatch):
    """Program ``b`` of a tensor starts at the first selected entry >= ``b * BLOCK`` (its segment's
    start for ``b = 0``): ``torch.searchsorted`` of the block starts in the sorted segment."""
    made = _count_ranges(monkeypatch)
    problem = make_problem(RANGE_SHAPES, density=0.3, seed=131)
    _both(problem, torch.float32, scores=_random_scores(RANGE_SHAPES, seed=133), score_mode="abs", amsgrad=True)
    assert len(made) == 1
    assert made[0].cpu().tolist() == _expected_ranges(problem.idx, problem)


def test_fused_ranges_cached_per_index_version(monkeypatch):
    """Computed once per index buffer, view position and layout, again after any in-place torch
    write (which bumps the version), and on every call for an inference-mode buffer."""
    made = _count_ranges(monkeypatch)
    q = _on_device(make_problem(RANGE_SHAPES, density=0.2, seed=137))
    scores = _random_scores(RANGE_SHAPES, seed=139)
    with backends.use("triton"):
        _ops_step(q, scores=scores)
        _ops_step(q, scores=scores)
        _ops_step(q, idx=q.idx[:], scores=scores)  # a view of the same buffer, same position: cached
        assert len(made) == 1
        _ops_step(q, scores=scores, mode="fisher")  # another statistic, same ranges
        _ops_step(q, scores=())  # the plain step needs none
        assert len(made) == 1
        q.idx.copy_(q.idx.clone())  # bumps the version: recomputed once
        _ops_step(q, scores=scores)
        _ops_step(q, scores=scores)
        assert len(made) == 2
        wide = torch.cat([q.idx, torch.zeros(5, dtype=torch.int32, device=DEVICE)])
        _ops_step(q, idx=wide[:q.idx.numel()], scores=scores)  # another buffer
        _ops_step(q, idx=wide[:q.idx.numel()], scores=scores)
        assert len(made) == 3
        with torch.inference_mode():
            frozen = q.idx.clone()
        _ops_step(q, idx=frozen, scores=scores)
        _ops_step(q, idx=frozen, scores=scores)
        assert len(made) == 5


@cpu_only
@pytest.mark.parametrize("amsgrad", [pytest.param(False, id="adam"), pytest.param(True, id="amsgrad")])
def test_fused_stale_ranges_still_step_every_entry_once(monkeypatch, amsgrad):
    """The index buffer rewritten behind fastmask's back (``.data``: no version bump) with other
    valid, sorted indices: the cached ranges are stale (entries now fall in other programs'
    blocks), yet every entry is stepped exactly once, as the reference steps the new indices."""
    made = _count_ranges(monkeypatch)
    start = _on_device(make_problem(RANGE_SHAPES, density=0.3, seed=141))
    scores0 = _random_scores(RANGE_SHAPES, seed=143)
    gen = torch.Generator().manual_seed(145)
    new_idx = torch.cat([random_indices(p.numel(), start.offsets[t + 1] - start.offsets[t], gen)
                         for t, p in enumerate(start.params)]).to(DEVICE)
    # most entries of the big tensors move to other blocks
    assert not torch.equal(new_idx, start.idx)

    warm = copy.deepcopy(start)
    idx = start.idx.clone()
    with backends.use("triton"):
        _ops_step(warm, idx=idx, scores=[s.clone() for s in scores0], amsgrad=amsgrad)  # caches the ranges
        version = idx._version
        idx.data.copy_(new_idx)
        assert idx._version == version
        out, out_scores = copy.deepcopy(start), [s.clone() for s in scores0]
        _ops_step(out, idx=idx, scores=out_scores, amsgrad=amsgrad)
    assert len(made) == 1, "the ranges were recomputed: the test does not exercise stale ranges"
    assert made[0].cpu().tolist() != _expected_ranges(new_idx, start), "the new indices fit the old ranges"
    fresh = copy.deepcopy(start)
    fresh.idx = new_idx
    ref, ref_scores = copy.deepcopy(fresh), [s.clone() for s in scores0]
    with backends.use("reference"):
        _ops_step(ref, scores=ref_scores, amsgrad=amsgrad)
    _compare(fresh, ref, out, torch.float32, amsgrad=amsgrad, ref_scores=ref_scores, out_scores=out_scores)


@cpu_only
@pytest.mark.parametrize("stale", [pytest.param(False, id="fresh-ranges"), pytest.param(True, id="stale-ranges")])
@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_fused_counts_every_out_of_range_index_even_unsorted(kind, stale):
    """Out-of-range indices in the middle of a multi-program segment (unsorted): every one is
    visited and counted (the programs split the segment whatever it holds), nothing outside the
    tensors is touched, and the bad entries' state is unchanged."""
    shapes = [(7,), (3, 5000), (9000,)]
    pr, pbuf, gbuf, inside = poisoned_problem(shapes, torch.float32, density=0.3, seed=151, guard=GUARD,
                                              device=DEVICE)
    where = 1
    lo, hi = pr.offsets[where], pr.offsets[where + 1]
    at = torch.tensor([lo + 5, (lo + hi) // 2, hi - 7])
    values = BAD_VALUES[kind](pr.params[where].numel())
    idx = pr.idx.clone()
    scores = _random_scores(shapes, seed=153)
    m, v, vm = pr.exp_avg.clone(), pr.exp_avg_sq.clone(), pr.max_exp_avg_sq.clone()
    if stale:  # the ranges cached for the valid contents, then the write without a version bump
        with backends.use("triton"):
            _ops_step(copy.deepcopy(pr), idx=idx, scores=[s.clone() for s in scores])
        idx.data[at.to(DEVICE)] = torch.tensor(values, dtype=torch.int32, device=DEVICE)
    else:
        idx[at.to(DEVICE)] = torch.tensor(values, dtype=torch.int32, device=DEVICE)
    keep = torch.ones(idx.numel(), dtype=torch.bool)
    keep[at] = False
    pbuf0, gbuf0 = pbuf.clone(), gbuf.clone()
    with pytest.raises(IndexError, match=rf"^idx: 3 indices of tensor {where} are outside"):
        _kernel_step(pr.params, pr.grads, idx, m, v, pr.offsets, pr.steps, vm, scores, "abs")
    _assert_untouched(pr, pbuf, pbuf0, gbuf, gbuf0, inside, keep, m, v, vm)


@cpu_only
@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_plain_step_unmasked_programs_skip_bad_indices(kind):
    """The plain step's programs wholly inside a segment run without masks on the compact arrays
    (vector accesses on a GPU) and write every entry's state back: an out-of-range index there is
    counted, its param/grad never accessed, its state (a NaN payload included) kept bit for bit;
    the other entries step exactly as without it. Segments start at unaligned positions."""
    shapes = [(7,), (3, 9000), (40001,)]
    pr, pbuf, gbuf, inside = poisoned_problem(shapes, torch.float32, density=0.5, seed=161, guard=GUARD,
                                              device=DEVICE)
    block = _kutils.dense_block(torch.device(DEVICE))
    where = 2
    lo, hi = pr.offsets[where], pr.offsets[where + 1]
    assert lo % 4 and hi - lo > 3 * block  # unaligned start; programs wholly inside the segment
    first_inside = (lo // 4) * 4 + block  # the second program of the tensor starts here
    at = torch.tensor([first_inside, first_inside + 1000, first_inside + block + 3])
    values = BAD_VALUES[kind](pr.params[where].numel())
    idx = pr.idx.clone()
    idx[at.to(DEVICE)] = torch.tensor(values, dtype=torch.int32, device=DEVICE)
    keep = torch.ones(idx.numel(), dtype=torch.bool)
    keep[at] = False
    nan_payload = torch.tensor([0x7FC01234], dtype=torch.int32).view(torch.float32).to(DEVICE)
    pr.exp_avg[at[:1].to(DEVICE)] = nan_payload  # one of them
    m, v, vm = pr.exp_avg.clone(), pr.exp_avg_sq.clone(), pr.max_exp_avg_sq.clone()
    pbuf0, gbuf0 = pbuf.clone(), gbuf.clone()
    with pytest.raises(IndexError, match=rf"^idx: 3 indices of tensor {where} are outside"):
        _kernel_step(pr.params, pr.grads, idx, m, v, pr.offsets, pr.steps, vm, [], "grad")
    assert torch.equal(_bits(pbuf)[~inside], _bits(pbuf0)[~inside]), "memory outside the params was written"
    assert torch.equal(_bits(gbuf), _bits(gbuf0)), "grads were written"
    bad = at.to(DEVICE)
    for name, after, before in (("exp_avg", m, pr.exp_avg), ("exp_avg_sq", v, pr.exp_avg_sq),
                                ("max_exp_avg_sq", vm, pr.max_exp_avg_sq)):
        assert torch.equal(_bits(after[bad]), _bits(before[bad])), f"bad entries' {name} changed"

    kd = keep.to(DEVICE)
    offsets = [int(keep[:o].sum()) for o in pr.offsets]
    params = [p.clone() for p in pr.params]
    for p, p0 in zip(params, poisoned_problem(shapes, torch.float32, density=0.5, seed=161, guard=GUARD,
                                              device=DEVICE)[0].params):
        p.copy_(p0)
    mc, vc, vmc = pr.exp_avg[kd].clone(), pr.exp_avg_sq[kd].clone(), pr.max_exp_avg_sq[kd].clone()
    _kernel_step(params, [g.clone() for g in pr.grads], idx[kd].clone(), mc, vc, offsets, pr.steps, vmc, [], "grad")
    for t, (a, b) in enumerate(zip(pr.params, params)):
        assert torch.equal(_bits(a), _bits(b)), f"params[{t}] differ from a step without the bad entries"
    assert torch.equal(m[kd], mc) and torch.equal(v[kd], vc) and torch.equal(vm[kd], vmc)


@cpu_only
@pytest.mark.parametrize("garbage", ["monotone", "random"])
def test_fused_step_stays_in_bounds_whatever_the_ranges_hold(monkeypatch, garbage):
    """The kernel clamps each program's range to its tensor's segment: with ranges that are
    garbage (far outside the segments), nothing outside the tensors is read or written; with
    non-decreasing garbage the programs still split every segment, so the step is exact."""
    mod = _kernel_module()
    shapes = [(7,), (3, 5000), (9000,), (4096,)]
    pr, pbuf, gbuf, inside = poisoned_problem(shapes, torch.float32, density=0.3, seed=181, guard=GUARD,
                                              device=DEVICE)
    gen = torch.Generator().manual_seed(183)

    def fake(table, n, idx, total, block, seg):
        k = idx.numel()
        junk = torch.randint(-2**40, 2**40, (total,), generator=gen)
        junk[: total // 2] = torch.randint(-5 * k, 6 * k, (total // 2,), generator=gen)
        junk = junk[torch.randperm(total, generator=gen)]
        return (junk.sort().values if garbage == "monotone" else junk).to(idx.device)

    monkeypatch.setattr(mod, "_fused_ranges", fake)
    scores0 = _random_scores(shapes, seed=185)
    before = copy.deepcopy(pr)
    pbuf0, gbuf0 = pbuf.clone(), gbuf.clone()
    scores = [s.clone() for s in scores0]
    _kernel_step(pr.params, pr.grads, pr.idx.clone(), pr.exp_avg, pr.exp_avg_sq, pr.offsets, pr.steps,
                 pr.max_exp_avg_sq, scores, "abs")
    assert torch.equal(_bits(pbuf)[~inside], _bits(pbuf0)[~inside]), "memory outside the params was written"
    assert torch.equal(_bits(gbuf), _bits(gbuf0)), "grads were written"
    if garbage == "monotone":
        ref = copy.deepcopy(before)
        ref_scores = [s.clone() for s in scores0]
        with backends.use("reference"):
            ops.masked_adamw_step_(ref.params, ref.grads, ref.idx, ref.exp_avg, ref.exp_avg_sq, ref.offsets,
                                   ref.steps, torch.tensor(1e-2, dtype=torch.float64), 0.9, 0.999, 1e-8, 0.1, False,
                                   max_exp_avg_sq=ref.max_exp_avg_sq, scores=ref_scores, score_mode="abs")
        _compare(before, ref, pr, torch.float32, amsgrad=True, ref_scores=ref_scores, out_scores=scores)


def _problem_with_counts(ks, dtype, seed):
    """A problem whose tensor ``t`` has ``2 * ks[t] + 1`` entries, ``ks[t]`` of them selected."""
    gen = torch.Generator().manual_seed(seed)
    problem = make_problem([(2 * k + 1,) for k in ks], dtype=dtype, density=0.0, seed=seed)
    problem.idx = torch.cat([random_indices(2 * k + 1, k, gen) for k in ks])
    problem.offsets = [0]
    for k in ks:
        problem.offsets.append(problem.offsets[-1] + k)
    n = problem.offsets[-1]
    problem.exp_avg = 0.1 * torch.randn(n, generator=gen)
    problem.exp_avg_sq = 0.01 * torch.rand(n, generator=gen) + 1e-4
    problem.max_exp_avg_sq = 0.02 * torch.rand(n, generator=gen) + 1e-4
    return problem


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_plain_step_unaligned_segments_match_reference(dtype):
    """Segments starting at every offset modulo 4, whose last program ends exactly at, one entry
    short of and one entry past their end: the aligned tiling (masked first and last programs,
    unmasked ones between) steps every entry once, exactly as the reference."""
    B = _kutils.dense_block(torch.device(DEVICE))
    ks = [1]  # then segments from 1 (to exactly 2B), 2B (to 4B - 1), 4B - 1 (to 6B - 3), ...
    for lo, hi in [(1, 2 * B), (2 * B, 4 * B - 1), (4 * B - 1, 6 * B - 3), (6 * B - 3, 8 * B - 2)]:
        ks.append(hi - lo)
    ks += [3, 2]
    problem = _problem_with_counts(ks, dtype, seed=171)
    assert {o % 4 for o in problem.offsets[:-1]} == {0, 1, 2, 3}
    _both(problem, dtype, amsgrad=True)


class _FakeIdx:
    """What DerivedCache reads of an index buffer, on a pretend CUDA device (no GPU needed)."""

    def __init__(self, n=10):
        self.device, self._base, self._version, self.n = torch.device("cuda", 0), None, 0, n

    def is_inference(self):
        return False

    def storage_offset(self):
        return 0

    def numel(self):
        return self.n


class _FakeEvent:
    """A CUDA event for the caches' bookkeeping tests (no GPU needed)."""
    complete = False

    def query(self):
        return self.complete


class _FakeDeviceTensor:
    """A device tensor that remembers the streams recorded on its memory."""

    def __init__(self):
        self.recorded = []

    def record_stream(self, stream):
        self.recorded.append(stream.stream_id)


class _FakeStream:
    def __init__(self, sid):
        self.stream_id, self.device_index, self.waits = sid, 0, []

    def wait_event(self, event):
        self.waits.append(event)


def test_derived_cache_orders_streams_and_keeps_graph_tensors(monkeypatch):
    """DerivedCache's bookkeeping with fake streams/events (no GPU needed), as TableCache's: computed
    once per buffer version; another stream waits for the computation once and is recorded on its
    memory; a capture reuses only a computation known complete (and pins it: eviction and new
    versions never free it), otherwise computes inside the capture, kept and never handed to
    eager calls."""
    from fastmask.kernels import _utils

    events, computed = [], []

    def compute():
        computed.append(_FakeDeviceTensor())
        return computed[-1]

    def record(device, stream):
        events.append(_FakeEvent())
        return events[-1]

    state = {"stream": _FakeStream(1), "capturing": False}
    monkeypatch.setattr(_utils, "_capturing", lambda device: state["capturing"])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["stream"])
    monkeypatch.setattr(_utils.DerivedCache, "_record", staticmethod(record))
    cache, idx, layout = _utils.DerivedCache(size=2), _FakeIdx(), ("L",)

    out = cache.get(idx, layout, compute)
    assert out is computed[0] and cache.get(idx, layout, compute) is out and len(computed) == 1
    s2 = state["stream"] = _FakeStream(2)
    assert cache.get(idx, layout, compute) is out and cache.get(idx, layout, compute) is out
    assert s2.waits == [events[0]] and out.recorded == [2], "stream 2: wait once, record once"

    state["capturing"] = True  # not known complete: computed inside the capture
    in_graph = cache.get(idx, layout, compute)
    assert in_graph is computed[1] and cache._captured == [in_graph]
    state["capturing"] = False
    assert cache.get(idx, layout, compute) is out, "an eager call got a tensor computed during a capture"

    events[0].complete = True
    s3 = state["stream"] = _FakeStream(3)
    assert cache.get(idx, layout, compute) is out and s3.waits == [] and out.recorded == [2, 3]
    state["capturing"] = True  # complete now: the capture uses it and pins it
    assert cache.get(idx, layout, compute) is out and len(computed) == 2
    state["capturing"] = False
    others = [_FakeIdx() for _ in range(4)]
    for other in others:  # evict everything evictable
        cache.get(other, layout, compute)
    assert cache.get(idx, layout, compute) is out and len(computed) == 6, "a tensor a graph uses was evicted"

    idx._version += 1  # an in-place write: a new computation, the pinned one stays pinned
    newer = cache.get(idx, layout, compute)
    assert newer is computed[-1] and newer is not out and len(computed) == 7
    assert any(hit[2].table is out for hit in cache._pinned.values())
    assert cache.get(idx, ("other layout",), compute) is computed[-1] and len(computed) == 8


def test_why_not_call():
    mod = backends.load("triton")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert mod.why_not_call(dtype, True) is None
    assert "torch.float64" in mod.why_not_call(torch.float64, True)
    assert "contiguous" in mod.why_not_call(torch.float32, False)


# ---------------------------------------------------------------------------------------------
# streams and CUDA graphs: the device table cache (kernels/_utils.py TableCache)
# ---------------------------------------------------------------------------------------------
def test_table_cache_orders_streams_and_keeps_graph_tables(monkeypatch):
    """The cache's bookkeeping, with fake streams/events (no GPU needed): a table copied on one
    stream is used on another only after that stream waits for the copy, and the stream is
    recorded on the table's memory; a capture reuses only a table whose copy is known complete
    (and pins it: eviction never frees it), otherwise copies one inside the capture, which is
    kept and never handed to eager calls."""
    from fastmask.kernels import _utils

    made, captured = [], []

    def new(rows, device, stream):
        made.append(_utils._Table(None, _FakeDeviceTensor(), _FakeEvent(), _utils._stream_key(stream)))
        return made[-1]

    def copy_in_capture(self, rows, device):
        table = _FakeDeviceTensor()
        captured.append(table)
        self._captured.append((None, table))
        return table

    state = {"stream": _FakeStream(1), "capturing": False}
    monkeypatch.setattr(_utils, "_capturing", lambda device: state["capturing"])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["stream"])
    monkeypatch.setattr(_utils.TableCache, "_new", staticmethod(new))
    monkeypatch.setattr(_utils.TableCache, "_copy_in_capture", copy_in_capture)
    cache, dev, rows = _utils.TableCache(size=2), torch.device("cuda", 0), [[1, 2], [3, 4]]

    table = cache.get(rows, dev)  # copied on stream 1
    entry = made[0]
    assert table is entry.table and entry.table.recorded == [] and state["stream"].waits == []
    s2 = state["stream"] = _FakeStream(2)
    assert cache.get(rows, dev) is table and cache.get(rows, dev) is table
    assert s2.waits == [entry.event] and entry.table.recorded == [2], "stream 2: wait once, record once"

    state["capturing"] = True  # copy not known complete: a table made inside the capture
    in_graph = cache.get(rows, dev)
    assert in_graph is captured[0] and in_graph is not table
    state["capturing"] = False
    assert cache.get(rows, dev) is table, "an eager call got a table made during a capture"

    entry.event.complete = True
    s3 = state["stream"] = _FakeStream(3)
    assert cache.get(rows, dev) is table and s3.waits == [] and entry.table.recorded == [2, 3]
    state["capturing"] = True  # complete now: the capture uses it and pins it
    assert cache.get(rows, dev) is table and len(captured) == 1
    state["capturing"] = False
    for k in range(5):  # evict everything evictable
        cache.get([[k]], dev)
    assert cache.get(rows, dev) is table and len(made) == 6, "a table a graph uses was evicted"


gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
GRAPH_BETAS = (0.95, 0.9999)
# The tensors of the stream and graph tests stay alive for the session: a later test's tensors
# cannot then reuse their addresses, so its tables never hit a table an earlier test pinned.
_KEEP_ALIVE = []


def _device_step(q, lr, scores=(), grads=None, found_inf=None, count=True):
    """One step of the op as an optimizer makes it: the step counts first, then the op."""
    if count:
        q.steps.add_(1)
    ops.masked_adamw_step_(q.params, grads or q.grads, q.idx, q.exp_avg, q.exp_avg_sq, q.offsets, q.steps, lr,
                           GRAPH_BETAS[0], GRAPH_BETAS[1], 1e-8, 0.1, False, max_exp_avg_sq=q.max_exp_avg_sq,
                           found_inf=found_inf, scores=list(scores), score_mode="fisher")


def _assert_same_run(out, ref, out_scores=(), ref_scores=()):
    for t, (a, b) in enumerate(zip(out.params, ref.params)):
        assert_close(a, b, **tol(a.dtype), what=f"params[{t}]")
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "steps"):
        _assert_equal(getattr(out, name), getattr(ref, name), name)
    for t, (a, b) in enumerate(zip(out_scores, ref_scores)):
        _assert_equal(a, b, f"scores[{t}]")


@gpu_only
def test_table_copy_is_ordered_across_streams():
    """The table is copied on a stream held busy, then used at once on another stream: the second
    launch must wait for the copy (it would read uninitialised memory otherwise)."""
    mod = _kernel_module()
    start = _trajectory_problem(torch.float32, seed=103)
    lr = torch.tensor(1e-3, dtype=torch.float64)
    ref = copy.deepcopy(start)
    with backends.use("reference"):
        _device_step(ref, lr)
    q = copy.deepcopy(start)
    q.steps.add_(1)
    skip, go = torch.ones((), device=DEVICE), torch.zeros((), device=DEVICE)
    with backends.use("triton"):
        # the index check reads idx (a host sync): done here, before the streams race
        ops.check_masked_adamw_step_(q.params, q.grads, q.idx, q.exp_avg, q.exp_avg_sq, q.offsets, q.steps, lr,
                                     *GRAPH_BETAS, 1e-8, 0.1, False, max_exp_avg_sq=q.max_exp_avg_sq)
        mod._tables._entries.clear()
        torch.cuda.synchronize()
        a, b = torch.cuda.Stream(), torch.cuda.Stream()
        with torch.cuda.stream(a):
            torch.cuda._sleep(200_000_000)  # keeps stream a busy for ~0.1 s
            _device_step(q, lr, found_inf=skip, count=False)  # table copied on a, behind the sleep; skipped
        with torch.cuda.stream(b):  # deliberately not ordered after a
            _device_step(q, lr, found_inf=go, count=False)  # the same table: must wait for its copy
        torch.cuda.synchronize()
    _KEEP_ALIVE.append((start, q, ref))
    _assert_same_run(q, ref)


@gpu_only
@pytest.mark.parametrize("fused", [pytest.param(False, id="step"), pytest.param(True, id="fused-scores")])
@pytest.mark.parametrize("table", ["known-complete", "made-in-capture"])
def test_cuda_graph_capture_and_replay(table, fused):
    """A step captured in a CUDA graph and replayed (new gradients copied into the static ones
    between replays) equals eager reference steps, also after the cache evicted every eager table
    and their memory was reused. ``known-complete``: the eager warm-up saw the table's copy
    complete, the graph uses that table; ``made-in-capture``: the warm-up used other gradient
    tensors, the capture copies its own table."""
    mod = _kernel_module()
    start = _trajectory_problem(torch.float32, seed=107)
    shapes = [p.shape for p in start.params]
    gen = torch.Generator().manual_seed(109)
    grads_seq = [[torch.randn(s, generator=gen).to(DEVICE) for s in shapes] for _ in range(5)]
    scores0 = _random_scores(shapes, seed=111) if fused else []
    lr = torch.tensor(1e-3, device=DEVICE)  # on the device: each replay reads it

    ref, ref_scores = copy.deepcopy(start), [x.clone() for x in scores0]
    with backends.use("reference"):
        for gs in grads_seq:
            for g, x in zip(ref.grads, gs):
                g.copy_(x)
            _device_step(ref, lr, ref_scores)

    out, out_scores = copy.deepcopy(start), [x.clone() for x in scores0]
    other = [g.clone() for g in out.grads]
    warm_grads = other if table == "made-in-capture" else out.grads
    with backends.use("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for gs in grads_seq[:2]:
                for g, x in zip(warm_grads, gs):
                    g.copy_(x)
                _device_step(out, lr, out_scores, grads=warm_grads)
                torch.cuda.synchronize()  # the next eager call sees the table's copy complete
        torch.cuda.current_stream().wait_stream(side)
        pinned, captured = len(mod._tables._pinned), len(mod._tables._captured)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _device_step(out, lr, out_scores)
        if table == "known-complete":
            assert len(mod._tables._pinned) == pinned + 1 and len(mod._tables._captured) == captured
        else:
            assert len(mod._tables._captured) == captured + 1
        for k in range(2 * mod._tables._size):  # evict every eager table ...
            mod._tables.get([[k, 1]], torch.device(DEVICE))
        junk = [torch.full((4096,), -1, dtype=torch.int64, device=DEVICE) for _ in range(64)]  # ... reuse memory
        for gs in grads_seq[2:]:
            for g, x in zip(out.grads, gs):
                g.copy_(x)
            graph.replay()
        torch.cuda.synchronize()
        del junk
    _KEEP_ALIVE.append((start, grads_seq, ref, ref_scores, out, out_scores, other, graph))
    _assert_same_run(out, ref, out_scores, ref_scores)


@gpu_only
@pytest.mark.parametrize("variant", ["plain", "scores-tensor-lr", "grad-scaler"])
def test_masked_adamw_steps_never_sync_the_host(variant):
    """``torch.cuda.set_sync_debug_mode("error")`` around ``MaskedAdamW`` steps through the Triton
    backend: no step after the first (which checks the masks' index buffers) waits for the GPU."""
    assert_steps_never_sync_the_host("triton", variant, device=DEVICE, seed=113)


BIG = os.environ.get("FASTMASK_TEST_BIG", "0") not in ("", "0")


@gpu_only
@pytest.mark.skipif(not BIG, reason="allocates ~17 GB on the GPU; set FASTMASK_TEST_BIG=1 (scripts/gpu_check.sh does)")
@pytest.mark.parametrize("fused", [pytest.param(False, id="step"), pytest.param(True, id="fused-scores")])
def test_indices_near_the_int32_limit(fused):
    """A bf16 tensor of 2^31 - 1 entries (the most int32 flat indices address) beside a small one:
    selected entries at both ends step exactly as the reference steps them on compact copies; the
    entries around them are not touched; fused scores reach the very last entry."""
    n = 2**31 - 1
    free, _ = torch.cuda.mem_get_info()
    if free < n * (2 + 2 + (4 if fused else 0)) + 2**31:
        pytest.skip(f"needs ~{n * (8 if fused else 4) / 2**30:.0f} GiB free on the GPU, {free / 2**30:.0f} GiB free")
    sel_big = torch.cat([torch.tensor([0, 1, 2, 1000, 2**30]), torch.arange(n - 5000, n)]).to(torch.int32)
    sel_small = torch.tensor([1, 5], dtype=torch.int32)
    gen = torch.Generator(device=DEVICE).manual_seed(115)
    big = torch.randn(n, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    big_grad = torch.randn(n, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    small = torch.randn(7, device=DEVICE, dtype=torch.bfloat16)
    small_grad = torch.randn(7, device=DEVICE, dtype=torch.bfloat16)
    k = sel_big.numel() + sel_small.numel()
    idx = torch.cat([sel_big, sel_small]).to(DEVICE)
    offsets = [0, sel_big.numel(), k]
    state = [torch.rand(k, generator=gen, device=DEVICE) * s for s in (0.1, 0.01, 0.02)]
    steps = torch.tensor([3.0, 4.0], device=DEVICE)
    scores = [torch.zeros(n, device=DEVICE), torch.zeros(7, device=DEVICE)] if fused else []
    tail = slice(n - 20000, n)
    tail_before = big[tail].clone()
    near = slice(3, 1000)
    near_before = big[near].clone()

    # the reference, on compact copies of the selected entries
    sel_long = sel_big.to(DEVICE).long()
    compact = [big[sel_long].clone(), small.clone()]
    compact_grads = [big_grad[sel_long].clone(), small_grad.clone()]
    ref_state = [x.clone() for x in state]
    with backends.use("reference"):
        ops.masked_adamw_step_(compact, compact_grads, torch.cat([torch.arange(sel_big.numel(), dtype=torch.int32),
                                                                  sel_small]).to(DEVICE),
                               ref_state[0], ref_state[1], offsets, steps, 1e-2, 0.9, 0.999, 1e-8, 0.1, False,
                               max_exp_avg_sq=ref_state[2])
    with backends.use("triton"):
        ops.masked_adamw_step_([big, small], [big_grad, small_grad], idx, state[0], state[1], offsets, steps, 1e-2,
                               0.9, 0.999, 1e-8, 0.1, False, max_exp_avg_sq=state[2], scores=scores,
                               score_mode="fisher")
    torch.cuda.synchronize()
    for name, a, b in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), state, ref_state):
        _assert_equal(a, b, name)
    assert_close(big[sel_long], compact[0], **tol(torch.bfloat16), what="selected entries of the big tensor")
    assert_close(small, compact[1], **tol(torch.bfloat16), what="the small tensor")
    unselected_tail = torch.ones(20000, dtype=torch.bool, device=DEVICE)
    unselected_tail[-5000:] = False
    assert torch.equal(big[tail][unselected_tail], tail_before[unselected_tail]), "unselected tail entries changed"
    assert torch.equal(big[near], near_before), "unselected entries near the start changed"
    if fused:
        g = big_grad[tail].float()
        _assert_equal(scores[0][tail], g * g, "scores of the last entries")
        g0 = big_grad[:1000].float()
        _assert_equal(scores[0][:1000], g0 * g0, "scores of the first entries")


# ---------------------------------------------------------------------------------------------
# availability
# ---------------------------------------------------------------------------------------------
def test_why_not():
    mod = backends.load("triton")
    assert mod.why_not("cpu") is None  # the tests run under the interpreter (or on a GPU)
    assert (mod.why_not("cuda") is None) == torch.cuda.is_available()
    for other in ("mps", "xpu", "meta"):
        reason = mod.why_not(other)
        assert isinstance(reason, str) and other in reason
    assert "triton" in backends.available(DEVICE) or DEVICE == "cpu"


def test_why_not_cpu_without_interpreter(monkeypatch):
    mod = backends.load("triton")
    monkeypatch.setattr(sys.modules["fastmask.kernels._utils"], "INTERPRETED", False)
    reason = mod.why_not("cpu")
    assert isinstance(reason, str) and "TRITON_INTERPRET" in reason


# The interpreter runs the kernels as Python and accepts code that the compiler rejects (types of
# scalars, scoping of constexpr branches, int -> pointer casts). Compiling for a real GPU target
# needs no GPU, only Triton's bundled ptxas, so do it in a fresh process without the interpreter.
_COMPILE_SCRIPT = r"""
import os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, sys.argv[1])
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from fastmask import backends
backends.load("triton")
ma = sys.modules["fastmask.kernels.masked_adamw"]
sa = sys.modules["fastmask.kernels.score_accumulate"]

def build(fn, sig, consts, num_warps=4):
    signature = {name: sig.get(name, "constexpr") for name in fn.arg_names}
    # pointer arguments 16-byte aligned, as Triton specializes them at a launch on aligned tensors
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if signature[name].startswith("*")}
    # the launch options of the backend (kernels/*.py): no FMA contraction
    return triton.compile(ASTSource(fn, signature, consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": False})

def vectors(body, what):
    # the unmasked blocks' accesses to contiguous, aligned memory: 16-byte vectors
    assert re.search(r"\bld\.global(?:\.\w+)*\.v4\.", body), f"{what}: no 16-byte vector loads"
    assert re.search(r"\bst\.global(?:\.\w+)*\.v4\.", body), f"{what}: no 16-byte vector stores"

def entry(ptx):
    # the kernel's own body (libdevice's pow is a separate .func, with its own approximations)
    lines = ptx.splitlines()
    first = next(i for i, l in enumerate(lines) if ".entry" in l)
    last = next(i for i in range(first, len(lines)) if lines[i] == "}")
    return "\n".join(lines[first:last])

def check_fp32(body, what):
    # (float64 approximations may appear inside libdevice's pow, which torch's CUDA pow runs too)
    approx = re.findall(r"\b(?:div\.full|div\.approx|sqrt\.approx|rcp\.approx|ex2\.approx|lg2\.approx)(?:\.ftz)?\.f32\b", body)
    assert not approx, f"{what}: approximate fp32 arithmetic {approx[:3]}"
    # fp32 products and sums Triton may contract are emitted without .rn; ptxas fuses those
    loose = re.findall(r"\b(?:mul|add|sub)\.f32\b", body)
    assert not loose, f"{what}: contractible fp32 arithmetic {loose[:3]}"

ptrs = ("max_exp_avg_sq_ptr", "lr_ptr", "grad_scale_ptr", "found_inf_ptr")
for pd, everything, fused, mode, cuda_rounding in [(tl.float32, False, False, 0, True), (tl.bfloat16, True, True, 2, True),
                                                   (tl.float16, True, False, 0, False), (tl.float32, True, True, 1, True)]:
    sig = dict(table_ptr="*i64", n_tensors="i32", idx_ptr="*i32", exp_avg_ptr="*fp32",
               exp_avg_sq_ptr="*fp32", steps_ptr="*fp32", err_ptr="*i32", lr_bits="i64", beta1_bits="i64",
               beta2_bits="i64", wd_bits="i64", omb1_bits="i32", b2_bits="i32", omb2_bits="i32", eps_bits="i32",
               ranges_ptr="*i64")
    consts = dict(P_DTYPE=pd, LR_ON_DEVICE=everything, AMSGRAD=everything, MAXIMIZE=everything,
                  HAS_SCALE=everything, HAS_INF=everything, FUSED_SCORES=fused, SCORE_MODE=mode,
                  CUDA_ROUNDING=cuda_rounding, DENSE_ALIGNED=fused, BLOCK=1024, SBLOCK=256, T_PAD=32)
    for p in ptrs:
        if everything:
            sig[p] = "*fp64" if p == "lr_ptr" else "*fp32"
        else:
            consts[p] = None
    warps = 4 if fused else ma.STEP_WARPS[1024]
    ptx = build(ma._masked_adamw_kernel, sig, consts, num_warps=warps).asm["ptx"]
    body = entry(ptx)
    check_fp32(body, f"step {pd} fused={fused}")
    vectors(body, f"step {pd} fused={fused}")
    assert "fma.rn.f32" in body, "the explicit FMAs (lerp, addcmul) are missing"
    # float64 per-tensor scalars: IEEE division and sqrt, CUDA's pow (as torch.pow on a GPU)
    assert "div.rn.f64" in body and "sqrt.rn.f64" in body, "fp64 scalars: IEEE division and sqrt"
# the fused step's per-program ranges (bisections, once per mask)
build(ma._block_ranges_kernel, dict(table_ptr="*i64", n_tensors="i32", idx_ptr="*i32", out_ptr="*i64", total="i32",
                                    n_iter="i32", t_iter="i32"), dict(BLOCK=1024, LANES=ma.RANGES_LANES))
for gd in (tl.float32, tl.bfloat16, tl.float64):
    ptx = build(sa._score_accumulate_kernel, dict(table_ptr="*i64", n_tensors="i32"),
                dict(G_DTYPE=gd, SCORE_MODE=2, ALIGNED=gd != tl.float64, BLOCK=1024, T_PAD=16)).asm["ptx"]
    check_fp32(entry(ptx), f"score {gd}")
    if gd != tl.float64:
        vectors(entry(ptx), f"score {gd}")
    assert "fma" not in entry(ptx), "score + g * g must round twice, as the reference's score.add_(g * g)"
# the masked weight gradient (fastmask.ops.sampled_weight_grad): fp32 accumulation of fp32/bf16 products
sg = sys.modules["fastmask.kernels.sampled_grad"]
for dt in ("fp32", "bf16"):
    ptx = build(sg._sampled_grad_kernel, dict(go_ptr="*" + dt, x_ptr="*" + dt, idx_ptr="*i32", out_ptr="*fp32",
                                              err_ptr="*i32", T="i32", n_in="i32", numel="i64", k="i32",
                                              s_go_t="i64", s_go_o="i32", s_x_t="i64", s_x_i="i32"),
                dict(BLOCK_K=64, BLOCK_T=32)).asm["ptx"]
    assert "atom.global" in entry(ptx) or "red.global" in entry(ptx), "out-of-range indices are not counted"
print("compiled")
"""


def test_kernels_compile_for_a_gpu_target():
    import os
    import subprocess
    from pathlib import Path

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"Triton's NVIDIA backend is not installed ({exc})")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(root)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stdout[-3000:] + run.stderr[-5000:]
