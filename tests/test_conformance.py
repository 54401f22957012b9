"""MaskedAdamW as a drop-in ``torch.optim.AdamW``: every AdamW configuration of PyTorch's own
optimizer database (``optim_db``'s ``optim_inputs_func``), every implementation flag, with masks
that select every entry or with no masks at all, on fp32/bf16/fp16/fp64/complex64 parameters of
contiguous, strided, channels_last layouts and with non-contiguous gradients, against
``torch.optim.AdamW`` built with the same arguments, over several steps.

What is compared, and how closely:

* **No masks**: the dense path runs PyTorch's own AdamW functional with the same flags, so
  parameters and state are bit-identical (``torch.equal``), every dtype and layout.
* **All-selecting masks, fp32/fp64/complex64**: the masked op reproduces AdamW's single-tensor
  arithmetic (scalars in float64 rounded once, the same order of fp32 operations), so state and
  parameters are compared at the ulp level: at most ``ULPS`` units in the last place after
  ``STEPS`` steps (the C++ kernels use IEEE sqrt, torch 2.13's CPU sqrt is one ulp off for some
  inputs; PyTorch's foreach/fused kernels round in other orders). A looser tolerance, e.g. one that
  hides computing ``1 - beta2`` in fp32, would hide a bug: that costs ~1e-4 relative.
* **All-selecting masks, bf16/fp16**: MaskedAdamW keeps fp32 state where AdamW keeps it in the
  parameter's dtype (by design: its state is small), so the two differ by more than rounding. Both
  are compared with AdamW run in fp32 on the same problem; MaskedAdamW's error must be at most
  twice AdamW's own low-precision error plus one ulp of the dtype (flash-attention's rule).

The database is imported from ``torch.testing._internal`` (shipped in the wheel; it needs the
``expecttest`` package); PyTorch's test file itself is not used.
"""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import fastmask
from fastmask import MaskedAdamW

from torch.testing._internal import common_optimizers  # needs expecttest (the test extra)

ADAMW = next(o for o in common_optimizers.optim_db if o.optim_cls is torch.optim.AdamW)
CONFIGS = {c.desc: c.kwargs for c in ADAMW.optim_inputs_func(device="cpu")}
IMPLS = {"default": {}, "forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64,
          "c64": torch.complex64}
LAYOUTS = ("contiguous", "strided", "channels_last", "grad_noncontig")
STEPS = 5
ULPS = 4  # params after STEPS steps, fp32/fp64/complex; state: see _state_ulps
SHAPES = [(3, 4, 5, 6), (37, 19), (64,)]


def _leaf(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A parameter tensor with x's values in the given memory layout (a view for 'strided')."""
    if layout == "strided" and x.dim() >= 1:
        # every other column of a wider buffer: the gaps must never be written
        buf = torch.full((*x.shape[:-1], 2 * x.shape[-1]), 7.0).to(x.dtype)
        view = buf[..., ::2]
        view.copy_(x)
        return view
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x.clone()


def _problem(dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    if dtype.is_complex:
        base = [torch.complex(b, torch.randn(b.shape, generator=g, dtype=torch.float64)) for b in base]
    return [b.to(dtype) for b in base]


def _grads(params, step, layout, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for p in params:
        x = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if p.is_complex():
            x = torch.complex(x, torch.randn(p.shape, generator=g, dtype=torch.float64))
        x = x.to(p.dtype)
        if layout == "grad_noncontig" and x.dim() >= 2:
            x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, column-major
        out.append(x)
    return out


def _make(dtype, layout):
    return [nn.Parameter(_leaf(x, layout)) for x in _problem(dtype, layout)]


def _as_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _ulps_in(dtype, a, b, ref=None, floor=0.0):
    """Largest |a - b| in units in the last place of ``dtype`` at max(|a|, |b|, |ref|): ``ref`` is
    the value the entries were computed from (a parameter's start value), so that an entry stepped
    close to zero is measured against the magnitudes that were rounded on the way."""
    a, b = _as_real(a.detach()).double().reshape(-1), _as_real(b.detach()).double().reshape(-1)
    if a.numel() == 0:
        return 0.0
    real = torch.empty(0, dtype=dtype).real.dtype
    fin = torch.finfo(real)
    mag = torch.maximum(a.abs(), b.abs())
    if ref is not None:
        mag = torch.maximum(mag, _as_real(ref.detach()).double().reshape(-1).abs())
    mag = mag.clamp_min(floor)
    return float(((a - b).abs() / (mag.clamp_min(fin.tiny) * fin.eps)).max())


def _run(opt, params, dtype, layout, steps=STEPS, start=0):
    for s in range(start, start + steps):
        for p, g in zip(params, _grads(params, s, layout)):
            p.grad = g
        opt.step()


def _supported(kwargs, dtype):
    # torch's fused AdamW takes real floating params only
    return not (kwargs.get("fused") and dtype.is_complex)


def _cases():
    for cfg in CONFIGS:
        for impl in IMPLS:
            for dname, dtype in DTYPES.items():
                for layout in LAYOUTS:
                    for masked in ("none", "all"):
                        if not _supported(IMPLS[impl], dtype):
                            continue
                        yield pytest.param(cfg, impl, dtype, layout, masked,
                                           id=f"{cfg}-{impl}-{dname}-{layout}-{masked}".replace(" ", "_"))


@pytest.mark.parametrize("cfg,impl,dtype,layout,masked", list(_cases()))
def test_matches_adamw(cfg, impl, dtype, layout, masked):
    kwargs = {**CONFIGS[cfg], **IMPLS[impl]}
    mine, theirs = _make(dtype, layout), _make(dtype, layout)
    start = _problem(dtype, layout)
    masks = {p: torch.arange(p.numel(), dtype=torch.int32) for p in mine} if masked == "all" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = MaskedAdamW(mine, masks=masks, **kwargs)
        ref = _reference_adamw(theirs, kwargs, layout)
        _run(opt, mine, dtype, layout)
        _run(ref, theirs, dtype, layout)

    for p in mine:  # the gaps of a strided view are never written
        if p._base is not None:
            gaps = torch.ones(p._base.shape, dtype=torch.bool)
            gaps[..., ::2] = False
            assert bool((p._base[gaps] == 7.0).all()), "memory between a strided param's entries was written"

    for p, q in zip(mine, theirs):
        sp, sq = opt.state[p], ref.state[q]
        assert float(sp["step"]) == float(sq["step"]) == STEPS
        if masked == "none":
            assert torch.equal(p, q), "dense params must be bit-identical to torch.optim.AdamW"
            for key in sq:
                assert torch.equal(sp[key], sq[key]), key
            continue
        assert torch.equal(sp["mask_indices"].long(), torch.arange(p.numel()))
        if dtype in (torch.bfloat16, torch.float16):
            _check_lowp(p, q, kwargs, layout)
            continue
        x0 = start[[tuple(s) for s in SHAPES].index(tuple(p.shape))]
        ulps = _ulps_in(dtype, p, q, ref=x0, floor=kwargs.get("lr", 1e-3))
        assert ulps <= ULPS, f"params differ by {ulps:.1f} ulp"
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in sq:
                # compact state = AdamW's state in the params' row-major order (real, imag pairs)
                want = _as_real(sq[key]).contiguous().reshape(-1)
                got = sp[key]
                assert got.dtype == want.dtype
                tol = 0 if IMPLS[impl] in ({}, {"foreach": False}) else ULPS
                assert _ulps_in(dtype, got, want) <= tol, f"{key} differs by {_ulps_in(dtype, got, want):.1f} ulp"


class _Both:
    """Two torch AdamWs stepping disjoint parameter sets as one optimizer."""

    def __init__(self, *opts):
        self.opts = [o for o in opts if o is not None]
        self.state = {}
        for o in self.opts:
            self.state.update(o.state)

    def step(self):
        for o in self.opts:
            o.step()
        for o in self.opts:
            self.state.update(o.state)


def _fusable(p, layout):
    """Whether torch's fused AdamW is correct for this param: it walks memory linearly, so param,
    grad and state must share one gap-free layout (grads here are contiguous, or column-major)."""
    g = _grads([p], 0, layout)[0]
    return p.is_contiguous() and g.is_contiguous()


def _reference_adamw(params, kwargs, layout):
    """torch.optim.AdamW with ``kwargs``; with fused=True, params its fused kernel would update
    wrongly (strided, channels_last, a grad of another layout) take torch's non-fused default,
    which is what MaskedAdamW does (and the only correct answer)."""
    if not kwargs.get("fused"):
        return torch.optim.AdamW(params, **kwargs)
    fused = [p for p in params if _fusable(p, layout)]
    rest = [p for p in params if not _fusable(p, layout)]
    plain = {k: v for k, v in kwargs.items() if k != "fused"}
    return _Both(torch.optim.AdamW(fused, **kwargs) if fused else None,
                 torch.optim.AdamW(rest, **plain) if rest else None)


def _check_lowp(p, q, kwargs, layout):
    """bf16/fp16 masked (fp32 state) vs AdamW in the same dtype, both measured against fp32 AdamW
    fed the same (low-precision) gradients."""
    dtype = p.dtype
    low = _make(dtype, layout)  # only for the gradient stream, which depends on the param list
    whole = [nn.Parameter(_leaf(x.float(), layout)) for x in _problem(dtype, layout)]
    exact = {k: v for k, v in kwargs.items() if k not in ("fused", "foreach")}  # the single-tensor oracle
    ref32 = torch.optim.AdamW(whole, **exact)
    for s in range(STEPS):
        for w, g in zip(whole, _grads(low, s, layout)):
            w.grad = g.float()
        ref32.step()
    w = whole[[tuple(x.shape) for x in whole].index(tuple(p.shape))]
    err_mine = (p.float() - w).abs().max().item()
    err_torch = (q.float() - w).abs().max().item()
    one_ulp = torch.finfo(dtype).eps * w.abs().max().item()
    assert err_mine <= 2 * err_torch + one_ulp, f"fp32-state error {err_mine} vs AdamW's {err_torch}"


# ------------------------------------------------------------------------------------------
# PyTorch's error inputs for AdamW: each raises (or, where torch only warns, is refused)
# ------------------------------------------------------------------------------------------
def _error_inputs():
    return list(ADAMW.optim_error_inputs_func(device="cpu", dtype=torch.float32))


@pytest.mark.parametrize("i", range(len(_error_inputs())),
                         ids=[e.optimizer_error_input.desc.replace(" ", "_") for e in _error_inputs()])
def test_error_inputs_raise(i):
    err = _error_inputs()[i]
    inp = err.optimizer_error_input
    assert err.error_on == common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR
    params = inp.params
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if issubclass(err.error_type, Warning):
            # torch warns about duplicate parameters and would step them twice; fastmask refuses them
            with pytest.raises(ValueError, match="twice"):
                MaskedAdamW(params, **inp.kwargs)
        else:
            with pytest.raises(err.error_type):
                MaskedAdamW(params, **inp.kwargs)


# ------------------------------------------------------------------------------------------
# the rest of the Optimizer contract
# ------------------------------------------------------------------------------------------
def _masked_problem():
    params = _make(torch.float32, "contiguous")
    g = torch.Generator().manual_seed(3)
    masks = {p: torch.sort(torch.randperm(p.numel(), generator=g)[: p.numel() // 5]).values.to(torch.int32)
             for p in params[:2]}
    return params, masks


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_keep_working(how):
    params, masks = _masked_problem()
    opt = MaskedAdamW(params, lr=1e-2, masks=masks, track_scores="abs")
    _run(opt, params, torch.float32, "contiguous", steps=2)
    pair = (params, opt)
    params2, opt2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert set(map(id, opt2.masks)) == set(map(id, params2[:2]))
    assert opt2.track_scores == "abs"
    sd, sd2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert sorted(sd) == sorted(sd2)
    for i in sd:
        assert sorted(sd[i]) == sorted(sd2[i])
        for k in sd[i]:
            assert torch.equal(sd[i][k], sd2[i][k]), k
    # state views still alias the copy's compact buffers: stepping the copy moves them together
    _run(opt, params, torch.float32, "contiguous", steps=3, start=2)
    _run(opt2, params2, torch.float32, "contiguous", steps=3, start=2)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    assert opt2.state[params2[0]]["exp_avg"].data_ptr() == opt2._buckets[0].exp_avg.data_ptr()


@pytest.mark.parametrize("direction", ["named-into-plain", "plain-into-named"])
def test_named_state_dict_loading_matches_torch(direction):
    def build(cls, named, masks=None):
        params = _make(torch.float32, "contiguous")
        arg = [(f"w{i}", p) for i, p in enumerate(params)] if named else params
        kw = {"masks": {params[0]: torch.arange(5, dtype=torch.int32)}} if cls is MaskedAdamW else {}
        return params, cls(arg, lr=1e-2, **kw)

    named_src = direction == "named-into-plain"
    results = {}
    for cls in (torch.optim.AdamW, MaskedAdamW):
        p1, src = build(cls, named_src)
        _run(src, p1, torch.float32, "contiguous", steps=1)
        p2, dst = build(cls, not named_src)
        dst.load_state_dict(src.state_dict())
        results[cls] = dst.param_groups[0].get("param_names")
    assert results[MaskedAdamW] == results[torch.optim.AdamW]


def test_hooks_run_like_torch():
    params, masks = _masked_problem()
    opt = MaskedAdamW(params, masks=masks)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    _run(opt, params, torch.float32, "contiguous", steps=1)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd-pre", "sd-post", "load-pre", "load-post"]


def test_state_holds_only_tensors():
    params, masks = _masked_problem()
    opt = MaskedAdamW(params, masks=masks, amsgrad=True)
    _run(opt, params, torch.float32, "contiguous", steps=1)
    for st in opt.state_dict()["state"].values():
        for key, value in st.items():
            assert isinstance(value, torch.Tensor), key


def test_optimizer_without_masks_adopts_saved_masks():
    params, masks = _masked_problem()
    opt = MaskedAdamW(params, lr=1e-2, masks=masks)
    _run(opt, params, torch.float32, "contiguous", steps=2)
    sd = opt.state_dict()
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = MaskedAdamW(params2, lr=1e-2)  # e.g. resumed from a Trainer checkpoint alone
    opt2.load_state_dict(sd)
    assert [torch.equal(opt2.masks[q], opt.masks[p]) for p, q in zip(params[:2], params2[:2])] == [True, True]
    _run(opt, params, torch.float32, "contiguous", steps=3, start=2)
    _run(opt2, params2, torch.float32, "contiguous", steps=3, start=2)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


def test_reference_serves_what_compiled_kernels_cannot():
    report = fastmask.backends.report(("cpu",))
    assert "reference" in report
    call = fastmask.backends.Call(dtype=torch.float64, contiguous=True)
    assert fastmask.backends.pick("cpu", call) == "reference"
    strided = fastmask.backends.Call(dtype=torch.float32, contiguous=False)
    assert fastmask.backends.pick("cpu", strided) == "reference"
