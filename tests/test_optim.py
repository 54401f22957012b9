"""MaskedAdamW against torch.optim.AdamW, and its optimizer contract (state, resume, AMP, masks)."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import fastmask
from fastmask import MaskedAdamW, MaskSet

from .utils import LOWP_VS_FP32_TOL, assert_close, random_indices

SHAPES = [(37, 19), (64,), (5, 7, 3)]


def _params(shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _masks(params, density=0.15, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {p: random_indices(p.numel(), int(density * p.numel()), g) for p in params}


def _grads(params, step, seed=2):
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _compact_copy(params, masks):
    return [nn.Parameter(p.detach().reshape(-1)[masks[p].long()].clone()) for p in params]


def _feed(params, compact, masks, step):
    """Random gradients for ``params``, and the same gradients at the selected entries for ``compact``."""
    for p, c, g in zip(params, compact, _grads(params, step)):
        p.grad = g
        c.grad = g.reshape(-1)[masks[p].long()].clone()


def _unselected(p, idx):
    keep = torch.ones(p.numel(), dtype=torch.bool)
    keep[idx.long()] = False
    return p.detach().reshape(-1)[keep]


# ------------------------------------------------------------------------------------------
# the maths: equal to AdamW run on a compact copy of the selected entries
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_matches_adamw_on_selected_entries(amsgrad, maximize):
    params = _params()
    masks = _masks(params)
    compact = _compact_copy(params, masks)
    # Two groups with different lr / weight decay.
    opt = MaskedAdamW([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}],
                      lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize, masks=masks)
    ref = torch.optim.AdamW([{"params": compact[:2]}, {"params": compact[2:], "lr": 3e-3, "weight_decay": 0.0}],
                            lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize, foreach=False)
    for step in range(200):
        _feed(params, compact, masks, step)
        opt.step()
        ref.step()
    for t, (p, c) in enumerate(zip(params, compact)):
        assert_close(p.detach().reshape(-1)[masks[p].long()], c.detach(), rtol=1e-6, atol=0, what=f"param {t}")
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            assert opt.state[p][key].shape == (masks[p].numel(),)
            assert_close(opt.state[p][key], ref.state[c][key], rtol=1e-6, atol=0, what=f"{key} {t}")
        assert float(opt.state[p]["step"]) == 200


@pytest.mark.parametrize("impl", [{}, {"fused": True}, {"foreach": True}, {"foreach": False}],
                         ids=["default", "fused", "foreach", "forloop"])
def test_dense_params_match_adamw(impl):
    params = _params()
    masks = _masks(params[:1])
    dense_ref = [nn.Parameter(p.detach().clone()) for p in params[1:]]
    opt = MaskedAdamW(params, lr=1e-2, weight_decay=0.1, masks=masks, **impl)
    ref = torch.optim.AdamW(dense_ref, lr=1e-2, weight_decay=0.1, **impl)
    for step in range(20):
        grads = _grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        for p, g in zip(dense_ref, grads[1:]):
            p.grad = g.clone()
        opt.step()
        ref.step()
    for p, q in zip(params[1:], dense_ref):
        assert torch.equal(p, q)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_unselected_entries_bit_exact(weight_decay):
    params = _params()
    masks = _masks(params)
    before = [_unselected(p, masks[p]) for p in params]
    opt = MaskedAdamW(params, lr=1e-2, weight_decay=weight_decay, masks=masks)
    for step in range(200):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(_unselected(p, masks[p]), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decay_unselected_reproduces_the_original(dtype):
    """With decay_unselected, unselected entries shrink exactly as AdamW's decoupled decay (with
    zero gradient and zero moments) shrinks them, in the parameter's dtype; selected entries
    follow the same AdamW maths as without it."""
    lr, wd, steps = 1e-2, 0.1, 50
    params = _params(dtype=dtype)
    masks = _masks(params)
    expected = [_unselected(p, masks[p]).clone() for p in params]
    compact = _compact_copy(params, masks)
    opt = MaskedAdamW(params, lr=lr, weight_decay=wd, masks=masks, decay_unselected=True)
    ref = torch.optim.AdamW(compact, lr=lr, weight_decay=wd, foreach=False)
    for step in range(steps):
        _feed(params, compact, masks, step)
        opt.step()
        ref.step()
        for e in expected:
            e.mul_(1 - lr * wd)
    for p, c, e in zip(params, compact, expected):
        assert torch.equal(_unselected(p, masks[p]), e)
        if dtype == torch.float32:
            assert_close(p.detach().reshape(-1)[masks[p].long()], c.detach(), rtol=1e-6, atol=0, what="selected")


# ------------------------------------------------------------------------------------------
# low precision
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params_track_fp32(dtype):
    p32, plow = _params(), _params(dtype=dtype)
    with torch.no_grad():
        for a, b in zip(p32, plow):
            a.copy_(b.float())  # the same starting point
    m32, mlow = _masks(p32), _masks(plow)
    o32 = MaskedAdamW(p32, lr=1e-3, weight_decay=0.1, masks=m32)
    olow = MaskedAdamW(plow, lr=1e-3, weight_decay=0.1, masks=mlow)
    for step in range(50):
        for a, b, g in zip(p32, plow, _grads(p32, step)):
            a.grad = g
            b.grad = g.to(dtype)
        o32.step()
        olow.step()
    rtol, atol = LOWP_VS_FP32_TOL[dtype]
    for a, b in zip(p32, plow):
        assert b.dtype == dtype
        assert_close(b.float(), a.detach(), rtol=rtol, atol=atol, what=str(dtype))
        assert olow.state[b]["exp_avg"].dtype == torch.float32


def test_mixed_dtypes_in_one_group():
    params = _params()[:2]
    params[1] = nn.Parameter(params[1].detach().to(torch.bfloat16))
    masks = _masks(params)
    opt = MaskedAdamW(params, lr=1e-2, masks=masks)
    assert len(opt._buckets) == 2
    for step in range(3):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    assert all(float(opt.state[p]["step"]) == 3 for p in params)


# ------------------------------------------------------------------------------------------
# state_dict: exact resume, refusal of foreign states
# ------------------------------------------------------------------------------------------
def _run(params, opt, steps, offset=0):
    for step in range(offset, offset + steps):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()


def _make(params, masks, **kw):
    kw = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True, "track_scores": "abs", **kw}
    return MaskedAdamW([{"params": params[:2]}, {"params": params[2:], "lr": 5e-3}], masks=masks, **kw)


def test_save_load_continue_is_bit_identical():
    params = _params()
    masks = _masks(params[:2])  # params[2] stays dense
    opt = _make(params, masks)
    _run(params, opt, 10)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    _run(params, opt, 10, offset=10)  # the uninterrupted run

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [nn.Parameter(t) for t in saved["params"]]
    opt2 = _make(resumed, {r: masks[p] for r, p in zip(resumed, params[:2])})
    opt2.load_state_dict(saved["opt"])
    _run(resumed, opt2, 10, offset=10)
    for p, r in zip(params, resumed):
        assert torch.equal(p, r)
    for p, r in zip(params, resumed):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt2.state[r][key]), key


def test_state_dict_carries_indices():
    params = _params()
    masks = _masks(params)
    opt = MaskedAdamW(params, masks=masks)
    sd = opt.state_dict()
    for i, p in enumerate(params):
        assert torch.equal(sd["state"][i]["mask_indices"], masks[p])
        assert sd["state"][i]["exp_avg"].shape == (masks[p].numel(),)


@pytest.mark.parametrize("case", ["other-masks", "fewer-entries", "masked-vs-dense", "dense-vs-masked", "groups", "shape"])
def test_load_refuses_foreign_state(case):
    params = _params()
    masks = _masks(params)
    opt = MaskedAdamW(params, masks=masks)
    _run(params, opt, 2)
    sd = opt.state_dict()
    if case == "other-masks":
        other = MaskedAdamW(params, masks=_masks(params, seed=7))
    elif case == "fewer-entries":
        other = MaskedAdamW(params, masks={p: m[:-1] for p, m in masks.items()})
    elif case == "masked-vs-dense":
        other = MaskedAdamW(params, masks={p: m for p, m in masks.items() if p is not params[1]})
    elif case == "dense-vs-masked":
        sd = MaskedAdamW(params, masks={}).state_dict()
        other = MaskedAdamW(params, masks=masks)
    elif case == "groups":
        other = MaskedAdamW([{"params": params[:1]}, {"params": params[1:]}], masks=masks)
    else:
        reshaped = [nn.Parameter(torch.randn(p.numel() + 1)) for p in params]
        sd = opt.state_dict()
        other = MaskedAdamW(reshaped, masks={})
    snapshot = {p: {k: v.clone() for k, v in other.state[p].items() if isinstance(v, torch.Tensor)} for p in other.state}
    with pytest.raises(ValueError, match="state|group|mask"):
        other.load_state_dict(sd)
    for p, st in snapshot.items():  # nothing was written
        for k, v in st.items():
            assert torch.equal(other.state[p][k], v)


# ------------------------------------------------------------------------------------------
# GradScaler, schedulers, closures, tensor lr, missing grads
# ------------------------------------------------------------------------------------------
def test_grad_scaler_skips_on_inf_and_unscales():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 17), nn.Tanh(), nn.Linear(17, 3))
    twin = nn.Sequential(nn.Linear(9, 17), nn.Tanh(), nn.Linear(17, 3))
    twin.load_state_dict(model.state_dict())
    idx0, idx2 = random_indices(9 * 17, 40), random_indices(17 * 3, 10)
    opt = MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, masks={model[0].weight: idx0, model[2].weight: idx2})
    ref = MaskedAdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, masks={twin[0].weight: idx0, twin[2].weight: idx2})
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(8, 9), torch.randn(8, 3)

    # A finite step through the scaler equals an unscaled step.
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    nn.functional.mse_loss(twin(x), y).backward()
    ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, what="scaled step")

    # An inf gradient: the whole step is skipped (params, state, step counts).
    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = {p: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for p, s in opt.state.items()}
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 1024.0
    for p, b in zip(model.parameters(), params_before):
        assert torch.equal(p, b)
    for p, st in state_before.items():
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v), k


def test_lr_scheduler_drives_masked_params():
    params = _params()
    masks = _masks(params)
    compact = _compact_copy(params, masks)
    opt = MaskedAdamW(params, lr=1e-2, masks=masks)
    ref = torch.optim.AdamW(compact, lr=1e-2, foreach=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    rsched = torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.5)
    for step in range(10):
        _feed(params, compact, masks, step)
        opt.step()
        ref.step()
        sched.step()
        rsched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    for p, c in zip(params, compact):
        assert_close(p.detach().reshape(-1)[masks[p].long()], c.detach(), rtol=1e-6, atol=0, what="sched")


def test_tensor_lr_matches_float_lr():
    a, b = _params(), _params()
    oa = MaskedAdamW(a, lr=torch.tensor(1e-2), masks=_masks(a))
    ob = MaskedAdamW(b, lr=1e-2, masks=_masks(b))
    _run(a, oa, 10)
    _run(b, ob, 10)
    for x, y in zip(a, b):
        assert_close(x.detach(), y.detach(), rtol=1e-6, atol=1e-7, what="tensor lr")


def test_closure_is_called_and_returned():
    params = _params()
    opt = MaskedAdamW(params, masks=_masks(params))
    calls = []

    def closure():
        calls.append(1)
        loss = sum((p.float() ** 2).sum() for p in params)
        opt.zero_grad()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls and isinstance(loss, torch.Tensor)
    assert float(opt.state[params[0]]["step"]) == 1


def test_params_without_grad_are_skipped():
    """A masked param whose grad is None in the middle of a bucket keeps its state and step."""
    params = _params()
    masks = _masks(params)
    compact = _compact_copy(params, masks)
    opt = MaskedAdamW(params, lr=1e-2, masks=masks)
    ref = torch.optim.AdamW(compact, lr=1e-2, foreach=False)
    for step in range(6):
        for i, (p, c, g) in enumerate(zip(params, compact, _grads(params, step))):
            skip = i == 1 and step % 2 == 0
            p.grad = None if skip else g
            c.grad = None if skip else g.reshape(-1)[masks[p].long()].clone()
        opt.step()
        ref.step()
    assert float(opt.state[params[1]]["step"]) == 3
    for p, c in zip(params, compact):
        assert_close(p.detach().reshape(-1)[masks[p].long()], c.detach(), rtol=1e-6, atol=0, what="partial")


# ------------------------------------------------------------------------------------------
# masks: construction, MaskSet + model, set_masks, tracked scores
# ------------------------------------------------------------------------------------------
def test_maskset_with_model_and_names():
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    scores = {"0.weight": torch.rand(10, 6), "2.weight": torch.rand(4, 10)}
    ms = fastmask.select(scores, 0.2)
    opt = MaskedAdamW(model.parameters(), masks=ms, model=model, track_scores="fisher")
    assert set(opt.masks) == {model[0].weight, model[2].weight}
    x = torch.randn(5, 6)
    model(x).sum().backward()
    g0 = model[0].weight.grad.clone()
    opt.step()
    s = opt.scores()
    assert set(s) == {"0.weight", "2.weight"}
    assert_close(s["0.weight"], g0 * g0, rtol=1e-6, atol=0, what="fisher")


@pytest.mark.parametrize("mode", ["grad", "abs", "fisher"])
def test_tracked_scores_accumulate_every_entry(mode):
    params = _params()
    named = [(f"w{i}", p) for i, p in enumerate(params)]
    opt = MaskedAdamW(named, lr=1e-3, masks=_masks(params), track_scores=mode)
    expected = [torch.zeros(p.shape) for p in params]
    for step in range(5):
        for p, g, e in zip(params, _grads(params, step), expected):
            p.grad = g
            e.add_({"grad": g, "abs": g.abs(), "fisher": g * g}[mode])
        opt.step()
    got = opt.scores()
    for i, e in enumerate(expected):
        assert_close(got[f"w{i}"], e.abs() if mode == "grad" else e, rtol=1e-5, atol=1e-6, what=mode)
    selected = fastmask.select(got, 0.1)
    assert set(selected) == {f"w{i}" for i in range(len(params))}


def test_scores_need_names_or_tracking():
    params = _params()
    with pytest.raises(RuntimeError, match="track_scores"):
        MaskedAdamW(params, masks=_masks(params)).scores()
    with pytest.raises(RuntimeError, match="names"):
        MaskedAdamW(params, masks=_masks(params), track_scores="abs").scores()


def test_set_masks_recreates_state_and_switches_dense():
    params = _params()
    opt = MaskedAdamW(params, lr=1e-2, masks=_masks(params[:2]))
    _run(params, opt, 3)
    new = _masks(params[1:], seed=5)  # params[0] becomes dense, params[2] becomes masked
    opt.set_masks(new)
    assert set(opt.masks) == set(params[1:])
    assert float(opt.state[params[1]]["step"]) == 0
    assert params[0] not in opt.state
    assert opt.state[params[2]]["exp_avg"].shape == (new[params[2]].numel(),)
    before = [_unselected(p, new[p]) for p in params[1:]]
    dense_before = params[0].detach().clone()
    _run(params, opt, 3, offset=3)
    for p, b in zip(params[1:], before):
        assert torch.equal(_unselected(p, new[p]), b)
    assert float(opt.state[params[0]]["step"]) == 3
    assert not torch.equal(params[0], dense_before)


@pytest.mark.parametrize("case", ["foreign-param", "out-of-range", "unsorted", "float-indices", "maskset-without-model",
                                  "bad-lr", "bad-beta", "bad-eps", "bad-wd", "bad-track"])
def test_constructor_errors(case):
    params = _params()
    masks = _masks(params)
    kw: dict = {"masks": masks}
    if case == "foreign-param":
        kw["masks"] = {nn.Parameter(torch.randn(3)): torch.tensor([0, 1])}
    elif case == "out-of-range":
        kw["masks"] = {params[1]: torch.tensor([3, 64])}
    elif case == "unsorted":
        kw["masks"] = {params[1]: torch.tensor([5, 3])}
    elif case == "float-indices":
        kw["masks"] = {params[1]: torch.tensor([1.0, 3.0])}
    elif case == "maskset-without-model":
        kw["masks"] = MaskSet()
    elif case == "bad-lr":
        kw["lr"] = -1.0
    elif case == "bad-beta":
        kw["betas"] = (0.9, 1.0)
    elif case == "bad-eps":
        kw["eps"] = -1.0
    elif case == "bad-wd":
        kw["weight_decay"] = -0.1
    elif case == "bad-track":
        kw["track_scores"] = "l2"
    with pytest.raises((ValueError, TypeError, IndexError), match="mask|lr|beta|eps|weight_decay|track_scores|contiguous|range|sorted|integer"):
        MaskedAdamW(params, **kw)


def test_zero_grad_and_repr():
    params = _params()
    opt = MaskedAdamW(params, masks=_masks(params))
    _run(params, opt, 1)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    assert "selected entries" in repr(opt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_inside_step_cuda():
    params = [nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    masks = {p: random_indices(p.numel(), p.numel() // 10).cuda() for p in params}
    dense = nn.Parameter(torch.randn(11, device="cuda"))
    opt = MaskedAdamW(params + [dense], lr=torch.tensor(1e-3, device="cuda"), masks=masks, fused=True)
    for p in params + [dense]:
        p.grad = torch.randn_like(p)
    opt.step()  # first step validates the index buffers (one sync, by design)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
