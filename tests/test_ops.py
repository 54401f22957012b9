"""The op schemas, their argument checks, and the reference kernels' semantics."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.library import opcheck

import fastmask
from fastmask import backends, ops

from .utils import assert_close, make_problem

SHAPES = [(7, 5), (13,), (3, 4, 5)]


def _args(pb, *, lr=1e-2, wd=0.1, maximize=False, amsgrad=False, grad_scale=None, found_inf=None,
          scores=None, score_mode="grad"):
    return (pb.params, pb.grads, pb.idx, pb.exp_avg, pb.exp_avg_sq, pb.offsets, pb.steps,
            torch.tensor(lr, dtype=torch.float64), 0.9, 0.999, 1e-8, wd, maximize,
            pb.max_exp_avg_sq if amsgrad else None, grad_scale, found_inf, scores or [], score_mode)


def _step(pb, **kw):
    torch.ops.fastmask.masked_adamw_step_(*_args(pb, **kw))


def _unselected(pb):
    out = []
    for t, p in enumerate(pb.params):
        keep = torch.ones(p.numel(), dtype=torch.bool)
        keep[pb.idx[pb.offsets[t]:pb.offsets[t + 1]].long()] = False
        out.append(p.reshape(-1)[keep])
    return out


# ------------------------------------------------------------------------------------------
# torch.library: schema, fake kernels, compile
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["plain", "amsgrad", "scaled", "found_inf", "scores"])
def test_opcheck_masked_adamw_step(variant):
    pb = make_problem(SHAPES, density=0.3)
    kw = {
        "plain": {},
        "amsgrad": {"amsgrad": True, "maximize": True},
        "scaled": {"grad_scale": torch.tensor([4.0])},
        "found_inf": {"found_inf": torch.zeros(1)},
        "scores": {"scores": [torch.rand(s) for s in SHAPES], "score_mode": "abs"},
    }[variant]
    opcheck(torch.ops.fastmask.masked_adamw_step_.default, _args(pb, **kw))


@pytest.mark.parametrize("mode", ops.SCORE_MODES)
def test_opcheck_score_accumulate(mode):
    grads = [torch.randn(s) for s in SHAPES]
    opcheck(torch.ops.fastmask.score_accumulate_.default, ([torch.rand(s) for s in SHAPES], grads, mode))


def test_compiled_call_matches_eager():
    a, b = make_problem(SHAPES, density=0.2), make_problem(SHAPES, density=0.2)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(params, grads, idx, m, v, steps, lr):
        torch.ops.fastmask.masked_adamw_step_(params, grads, idx, m, v, a.offsets, steps, lr,
                                              0.9, 0.999, 1e-8, 0.1, False, None, None, None, [], "grad")

    step(a.params, a.grads, a.idx, a.exp_avg, a.exp_avg_sq, a.steps, torch.tensor(1e-2, dtype=torch.float64))
    _step(b)
    for x, y in zip(a.params, b.params):
        assert torch.equal(x, y)
    assert torch.equal(a.exp_avg, b.exp_avg) and torch.equal(a.exp_avg_sq, b.exp_avg_sq)


# ------------------------------------------------------------------------------------------
# semantics of the reference kernels
# ------------------------------------------------------------------------------------------
def test_step_matches_torch_adamw_per_tensor():
    """One op call == one torch.optim.AdamW step on a compact copy of each tensor's entries."""
    pb = make_problem(SHAPES, density=0.4)
    expected = []
    for t, (p, g) in enumerate(zip(pb.params, pb.grads)):
        sel = pb.idx[pb.offsets[t]:pb.offsets[t + 1]].long()
        q = torch.nn.Parameter(p.reshape(-1)[sel].clone())
        q.grad = g.reshape(-1)[sel].clone()
        opt = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, foreach=False)
        opt.state[q] = {"step": pb.steps[t].clone() - 1,
                        "exp_avg": pb.exp_avg[pb.offsets[t]:pb.offsets[t + 1]].clone(),
                        "exp_avg_sq": pb.exp_avg_sq[pb.offsets[t]:pb.offsets[t + 1]].clone()}
        opt.step()
        expected.append(q.detach())
    _step(pb)
    for t, p in enumerate(pb.params):
        sel = pb.idx[pb.offsets[t]:pb.offsets[t + 1]].long()
        assert_close(p.reshape(-1)[sel], expected[t], rtol=1e-6, atol=0, what=f"tensor {t}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_unselected_entries_untouched(dtype):
    pb = make_problem(SHAPES, dtype=dtype, density=0.1)
    before = _unselected(pb)
    for _ in range(5):
        _step(pb, wd=0.5, scores=[torch.rand(s) for s in SHAPES])
    for b, a in zip(before, _unselected(pb)):
        assert torch.equal(b, a)


def test_found_inf_skips_everything():
    pb = make_problem(SHAPES, density=0.3)
    ref = copy.deepcopy(pb)
    scores = [torch.rand(s) for s in SHAPES]
    scores_before = [s.clone() for s in scores]
    for g in pb.grads:
        g[0] = float("inf")
    _step(pb, amsgrad=True, found_inf=torch.ones(1), grad_scale=torch.tensor([2.0]), scores=scores)
    for name in ("params", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        x, y = getattr(pb, name), getattr(ref, name)
        for u, v in zip(x if isinstance(x, list) else [x], y if isinstance(y, list) else [y]):
            assert torch.equal(u, v), name
    for s, s0 in zip(scores, scores_before):
        assert torch.equal(s, s0)


def test_grad_scale_divides_gradients():
    a, b = make_problem(SHAPES, density=0.3), make_problem(SHAPES, density=0.3)
    for g in a.grads:
        g.mul_(8.0)
    _step(a, grad_scale=torch.tensor([8.0]))
    _step(b)
    for x, y in zip(a.params, b.params):
        assert_close(x, y, rtol=1e-6, atol=1e-7, what="params")


def test_maximize_negates_gradients():
    a, b = make_problem(SHAPES, density=0.3), make_problem(SHAPES, density=0.3)
    for g in b.grads:
        g.neg_()
    _step(a, maximize=True)
    _step(b)
    for x, y in zip(a.params, b.params):
        assert torch.equal(x, y)


def test_amsgrad_keeps_running_max():
    pb = make_problem(SHAPES, density=0.3)
    before = pb.max_exp_avg_sq.clone()
    _step(pb, amsgrad=True)
    assert torch.equal(pb.max_exp_avg_sq, torch.maximum(before, pb.exp_avg_sq))


@pytest.mark.parametrize("mode", ops.SCORE_MODES)
def test_fused_scores_equal_score_accumulate(mode):
    pb = make_problem(SHAPES, density=0.2)
    fused = [torch.rand(s) for s in SHAPES]
    separate = [s.clone() for s in fused]
    grads = [g.clone() for g in pb.grads]
    _step(pb, scores=fused, score_mode=mode, grad_scale=torch.tensor([2.0]))
    ops.score_accumulate_(separate, [g / 2.0 for g in grads], mode)
    for f, s in zip(fused, separate):
        assert_close(f, s, rtol=1e-6, atol=1e-7, what=mode)


@pytest.mark.parametrize("mode", ops.SCORE_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_score_accumulate_modes(mode, dtype):
    scores = [torch.rand(s) for s in SHAPES]
    grads = [torch.randn(s).to(dtype) for s in SHAPES]
    expected = []
    for s, g in zip(scores, grads):
        g = g.float()
        expected.append(s + {"grad": g, "abs": g.abs(), "fisher": g * g}[mode])
    ops.score_accumulate_(scores, grads, mode)
    for s, e in zip(scores, expected):
        assert_close(s, e, rtol=1e-6, atol=1e-7, what=mode)


@pytest.mark.parametrize("density", [0.0, 1.0], ids=["none", "all"])
def test_density_extremes_and_empty_tensor(density):
    shapes = [(5, 3), (0,), (11,)]
    pb = make_problem(shapes, density=density)
    before = [p.clone() for p in pb.params]
    _step(pb)
    for b, a in zip(before, pb.params):
        if density == 0.0 or a.numel() == 0:
            assert torch.equal(a, b)
        else:
            assert bool((a != b).all()), "every entry is selected at density 1, so every entry moves"


def test_no_tensors_is_a_no_op():
    ops.masked_adamw_step_([], [], torch.empty(0, dtype=torch.int32), torch.empty(0), torch.empty(0),
                           [0], torch.empty(0), 1e-3)
    ops.score_accumulate_([], [], "abs")


# ------------------------------------------------------------------------------------------
# argument checks: each bad input raises, naming the argument, and writes nothing
# ------------------------------------------------------------------------------------------
def _bad_cases():
    """case -> (mutation of the argument list, the argument the error must name)."""
    return {
        "grads-count": (lambda a: a.__setitem__(1, a[1][:-1]), "grads"),
        "offsets-count": (lambda a: a.__setitem__(5, a[5][:-1]), "offsets"),
        "scores-count": (lambda a: a.__setitem__(16, [torch.zeros(SHAPES[0])]), "scores"),
        "score-mode": (lambda a: a.__setitem__(17, "magnitude"), "score_mode"),
        "beta1": (lambda a: a.__setitem__(8, 1.0), "beta1"),
        "beta2": (lambda a: a.__setitem__(9, -0.1), "beta2"),
        "eps": (lambda a: a.__setitem__(10, -1e-8), "eps"),
        "weight-decay": (lambda a: a.__setitem__(11, -0.1), "weight_decay"),
        "param-dtype": (lambda a: a[0].__setitem__(0, a[0][0].double()), "params[0]"),
        "mixed-dtypes": (lambda a: a[0].__setitem__(1, a[0][1].half()), "params[1]"),
        "param-int": (lambda a: (a[0].__setitem__(0, a[0][0].int()), a[1].__setitem__(0, a[1][0].int())), "params[0]"),
        "param-complex": (lambda a: (a[0].__setitem__(0, a[0][0].cfloat()), a[1].__setitem__(0, a[1][0].cfloat())),
                          "params[0]"),
        "fp64-params-fp32-state": (lambda a: [(a[0].__setitem__(i, a[0][i].double()), a[1].__setitem__(i, a[1][i].double()))
                                              for i in range(3)], "exp_avg"),
        "grad-shape": (lambda a: a[1].__setitem__(0, a[1][0].reshape(-1)), "grads[0]"),
        "grad-dtype": (lambda a: a[1].__setitem__(0, a[1][0].double()), "grads[0]"),
        "grad-sparse": (lambda a: a[1].__setitem__(1, a[1][1].to_sparse()), "grads[1]"),
        "idx-dtype": (lambda a: a.__setitem__(2, a[2].long()), "idx"),
        "idx-2d": (lambda a: a.__setitem__(2, a[2].reshape(1, -1)), "idx"),
        "offsets-start": (lambda a: a.__setitem__(5, [1] + a[5][1:]), "offsets"),
        "offsets-end": (lambda a: a.__setitem__(5, a[5][:-1] + [a[5][-1] - 1]), "offsets"),
        "offsets-order": (lambda a: a.__setitem__(5, [0, a[5][2], a[5][1], a[5][3]]), "offsets"),
        "segment-too-long": (lambda a: a.__setitem__(5, [0, 0, a[5][3], a[5][3]]), "offsets"),
        "exp-avg-dtype": (lambda a: a.__setitem__(3, a[3].double()), "exp_avg"),
        "exp-avg-sq-len": (lambda a: a.__setitem__(4, a[4][:-1]), "exp_avg_sq"),
        "max-exp-avg-sq-len": (lambda a: a.__setitem__(13, torch.zeros(3)), "max_exp_avg_sq"),
        "steps-shape": (lambda a: a.__setitem__(6, a[6][:1]), "steps"),
        "steps-dtype": (lambda a: a.__setitem__(6, a[6].long()), "steps"),
        "lr-shape": (lambda a: a.__setitem__(7, torch.tensor([1e-3, 1e-3])), "lr"),
        "grad-scale-shape": (lambda a: a.__setitem__(14, torch.ones(2)), "grad_scale"),
        "found-inf-dtype": (lambda a: a.__setitem__(15, torch.zeros(1, dtype=torch.int32)), "found_inf"),
        "scores-dtype": (lambda a: a.__setitem__(16, [torch.zeros(s, dtype=torch.float16) for s in SHAPES]), "scores[0]"),
        "scores-shape": (lambda a: a.__setitem__(16, [torch.zeros(s).reshape(-1) for s in SHAPES]), "scores[0]"),
        "index-out-of-range": (lambda a: a[2].__setitem__(a[5][1] - 1, 35), "idx"),
        "index-negative": (lambda a: a[2].__setitem__(0, -1), "idx"),
        "index-unsorted": (lambda a: a[2].__setitem__(slice(0, 2), a[2][0:2].flip(0).clone()), "idx"),
        "index-duplicate": (lambda a: a[2].__setitem__(1, a[2][0].item()), "idx"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_and_writes_nothing(case):
    fn, name = _bad_cases()[case]
    pb = make_problem(SHAPES, density=0.3)
    args = list(_args(pb, scores=[torch.rand(s) for s in SHAPES]))
    args[0], args[1] = list(args[0]), list(args[1])
    fn(args)
    snapshot = [t.clone() for t in args[0]] + [args[3].clone(), args[4].clone()] + [s.clone() for s in args[16]]
    with pytest.raises((ValueError, TypeError, IndexError, RuntimeError)) as info:
        torch.ops.fastmask.masked_adamw_step_(*args)
    assert name.split("[")[0] in str(info.value), f"error should name {name!r}: {info.value}"
    after = list(args[0]) + [args[3], args[4]] + list(args[16])
    for b, a in zip(snapshot, after):
        assert torch.equal(b, a), "a rejected call must not write"


def test_index_contents_are_rechecked_after_in_place_writes():
    pb = make_problem(SHAPES, density=0.3)
    _step(pb)  # validates and caches this idx buffer
    pb.idx[pb.offsets[1] - 1] = 10_000  # in-place write bumps the version counter
    with pytest.raises(IndexError, match="out of range"):
        _step(pb)


@pytest.mark.parametrize("case", ["count", "mode", "dtype", "shape", "sparse"])
def test_score_accumulate_bad_input(case):
    scores = [torch.zeros(s) for s in SHAPES]
    grads = [torch.randn(s) for s in SHAPES]
    if case == "count":
        grads = grads[:2]
    elif case == "mode":
        mode = "l2"
    elif case == "dtype":
        scores[0] = scores[0].half()
    elif case == "shape":
        scores[1] = torch.zeros(14)
    elif case == "sparse":
        grads[1] = grads[1].to_sparse()
    mode = "l2" if case == "mode" else "grad"
    with pytest.raises((ValueError, TypeError), match="scores|grads|mode"):
        ops.score_accumulate_(scores, grads, mode)
    assert all(not s.any() for s in scores if s.dtype == torch.float32 and s.shape != (14,))


def test_public_api_exports():
    for name in ("score", "select", "MaskSet", "Mask", "MaskedAdamW", "find_targets", "freeze", "backends", "ops"):
        assert hasattr(fastmask, name), name


@pytest.mark.parametrize("kind", ["transposed", "sliced", "channels_last", "fp64"])
def test_strided_and_fp64_params_step_like_contiguous_copies(kind):
    """Any layout and float64: the op (reference backend) equals the same step on contiguous
    copies, bit for bit, and never writes memory between a view's entries."""
    g = torch.Generator().manual_seed(4)
    dtype = torch.float64 if kind == "fp64" else torch.float32
    shape = (4, 6, 5, 3)
    base = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], generator=g, dtype=dtype)
    if kind == "transposed":
        p = base[..., : shape[3]].clone().transpose(0, 2)
    elif kind == "sliced":
        p = base[..., ::2]
    elif kind == "channels_last":
        p = base[..., : shape[3]].contiguous(memory_format=torch.channels_last)
    else:
        p = base[..., : shape[3]].clone()
    grad = torch.randn(p.shape, generator=g, dtype=dtype).transpose(0, 1).contiguous().transpose(0, 1)
    idx = torch.sort(torch.randperm(p.numel(), generator=g)[: p.numel() // 3]).values.to(torch.int32)
    k = idx.numel()
    sdt = ops.state_dtype(dtype)
    state = [torch.rand(k, generator=g, dtype=torch.float64).to(sdt) for _ in range(2)]
    q = p.contiguous().clone()
    p0 = q.clone()
    before = base.clone()
    args = dict(idx=idx, offsets=[0, k], steps=torch.tensor([3.0]), lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.1)
    m1, v1 = (s.clone() for s in state)
    m2, v2 = (s.clone() for s in state)
    ops.masked_adamw_step_([p], [grad], exp_avg=m1, exp_avg_sq=v1, **args)
    with backends.use("reference"):  # the oracle on contiguous copies (the ext rounds sqrt differently)
        ops.masked_adamw_step_([q], [grad.contiguous()], exp_avg=m2, exp_avg_sq=v2, **args)
    assert torch.equal(p, q) and torch.equal(m1, m2) and torch.equal(v1, v2)
    moved = p.contiguous().view(-1)[idx.long()] != p0.view(-1)[idx.long()]
    assert bool(moved.all()), "every selected entry moves"
    if kind == "sliced":  # the gaps between the view's entries are never written
        assert torch.equal(base[..., 1::2], before[..., 1::2])
