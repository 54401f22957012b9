"""MaskedAdamW on bad inputs: every failing call raises a clear error naming what is wrong, and
leaves parameters and optimizer state bit-identical to what they were before the call.

Also the edge cases that must *not* fail (mask adoption from a state dict, inference mode, meta
parameters, odd layouts and dtypes, deepcopy/pickle), and index buffers corrupted behind the
version counter's back (the kernels must refuse them without writing outside the tensors).
"""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

import fastmask
from fastmask import MaskedAdamW

SHAPES = {"w0": (37, 19), "b0": (64,), "w1": (5, 7, 3), "b1": (13,)}


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def rand_mask(numel: int, k: int) -> torch.Tensor:
    return torch.sort(torch.randperm(numel)[:k]).values.to(torch.int32)


class Net(nn.Module):
    """w0, b0 (group 0), w1, b1 (group 1), and ``frozen``, never given to the optimizer."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, shape in SHAPES.items():
            setattr(self, name, nn.Parameter(torch.randn(shape, generator=g)))
        self.frozen = nn.Parameter(torch.randn(6, 5, generator=g))

    def params(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in SHAPES]


def default_masks(net: Net) -> dict:
    return {net.w0: rand_mask(net.w0.numel(), 90), net.w1: rand_mask(net.w1.numel(), 21)}


def groups_of(net: Net, *, decay0: bool = False, named: bool = False) -> list[dict]:
    def ps(*names):
        return [(n, getattr(net, n)) if named else getattr(net, n) for n in names]

    return [{"params": ps("w0", "b0"), "decay_unselected": decay0},
            {"params": ps("w1", "b1"), "lr": 3e-3, "weight_decay": 0.05}]


def make_opt(net: Net, masks=None, *, decay0: bool = False, model: bool = True, **kw) -> MaskedAdamW:
    masks = default_masks(net) if masks is None else masks
    kw = {"lr": 1e-2, "weight_decay": 0.1, **kw}
    return MaskedAdamW(groups_of(net, decay0=decay0), masks=masks, model=net if model else None, **kw)


def feed(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def good_steps(opt, params, n: int = 2, seed: int = 100) -> None:
    for s in range(n):
        feed(params, seed + s)
        opt.step()


def clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone_tree(v) for v in x)
    return copy.copy(x)


def assert_same_tree(a, b, where: str = "") -> None:
    """Equal structure; tensors equal bit for bit (NaN where NaN), same dtype, shape and device."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor became {type(b).__name__}"
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), f"{where}: metadata changed"
        if a.is_floating_point() or a.is_complex():
            same = torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])
            assert same, f"{where}: values changed"
        else:
            same = torch.equal(a, b)
            assert same, f"{where}: values changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys changed {set(a) ^ set(b or {})}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length changed"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: {a} became {b}"
    else:
        assert a == b, f"{where}: {a!r} became {b!r}"


def snapshot(opt: MaskedAdamW, params) -> dict:
    """Everything a failing call must leave alone (deep copies)."""
    return {
        "params": [(p, p.detach().clone()) for p in params],
        "grads": [(p, None if p.grad is None else p.grad.detach().clone()) for p in params],
        "state": [(p, clone_tree(dict(st))) for p, st in opt.state.items()],
        "state_dict": clone_tree(opt.state_dict()),
        "masks": [(p, m.clone()) for p, m in opt.masks.items()],
        "groups": [({k: clone_tree(v) for k, v in g.items() if k != "params"}, list(g["params"]))
                   for g in opt.param_groups],
    }


def assert_unchanged(opt: MaskedAdamW, params, snap: dict) -> None:
    for i, (p, before) in enumerate(snap["params"]):
        same = torch.equal(p.detach(), before)
        assert same, f"params[{i}] (shape {tuple(p.shape)}) was written"
    assert [id(p) for p in params] == [id(p) for p, _ in snap["params"]]
    # every tensor in opt.state: the same params, the same keys, the same bits
    now = list(opt.state.items())
    assert [id(p) for p, _ in now] == [id(p) for p, _ in snap["state"]], "opt.state gained or lost entries"
    for i, ((p, st), (_, before)) in enumerate(zip(now, snap["state"])):
        assert_same_tree(before, dict(st), f"opt.state[param {i} of shape {tuple(p.shape)}]")
    assert_same_tree(snap["state_dict"], opt.state_dict(), "state_dict()")
    masks = list(opt.masks.items())
    assert [id(p) for p, _ in masks] == [id(p) for p, _ in snap["masks"]], "opt.masks changed its keys"
    for (p, m), (_, before) in zip(masks, snap["masks"]):
        same = torch.equal(m, before)
        assert same, f"the mask of shape {tuple(p.shape)} changed"
    assert len(opt.param_groups) == len(snap["groups"])
    for g, (hyper, ps) in zip(opt.param_groups, snap["groups"]):
        assert [id(p) for p in g["params"]] == [id(p) for p in ps]
        assert_same_tree(hyper, {k: v for k, v in g.items() if k != "params"}, "param_groups")


def stepped_opt(seed: int = 0, **kw):
    net = Net(seed)
    opt = make_opt(net, **kw)
    good_steps(opt, net.params())
    return net, opt


# ------------------------------------------------------------------------------------------
# step(): a bad gradient in the second group leaves the first one unstepped
# ------------------------------------------------------------------------------------------
def _bad_grad(p: nn.Parameter, kind: str) -> None:
    g = torch.Generator().manual_seed(7)
    if kind == "shape":  # torch refuses such an assignment; .data slips past it, as user code may
        p.grad = torch.randn(p.shape, generator=g)
        p.grad.data = torch.randn(p.numel() + 3, generator=g)
    elif kind == "dtype":
        p.grad = torch.randn(p.shape, generator=g)
        p.grad.data = torch.randn(p.shape, generator=g, dtype=torch.float64)
    else:
        p.grad = torch.randn(p.shape, generator=g).to_sparse()


@pytest.mark.parametrize("decay0", [False, True], ids=["plain", "decay_unselected"])
@pytest.mark.parametrize("who", ["w1", "b1"], ids=["masked", "dense"])
@pytest.mark.parametrize("kind,exc,match", [
    ("shape", ValueError, r"grad of '{who}'.*\(\d+,\)"),
    ("dtype", ValueError, r"grad of '{who}'.*float64"),
    ("sparse", RuntimeError, r"sparse.*'{who}'"),
], ids=["shape", "dtype", "sparse"])
def test_bad_grad_in_second_group_steps_nothing(kind, exc, match, who, decay0):
    net, opt = stepped_opt(decay0=decay0)
    params = net.params()
    feed(params, 500)
    _bad_grad(getattr(net, who), kind)
    snap = snapshot(opt, params)
    with pytest.raises(exc, match=match.format(who=who)):
        opt.step()
    assert_unchanged(opt, params, snap)
    # group 0 in particular: masked, dense params and their step counts
    assert float(opt.state[net.w0]["step"]) == 2 and float(opt.state[net.b0]["step"]) == 2


# ------------------------------------------------------------------------------------------
# step(): bad hyper-parameters set on a param group after construction
# ------------------------------------------------------------------------------------------
BAD_GROUP_VALUES = [
    ("lr", -1e-3, r"param_groups\[1\]\['lr'\].*-0\.001"),
    ("lr", float("nan"), r"param_groups\[1\]\['lr'\].*nan"),
    ("lr", torch.tensor(-1e-3), r"param_groups\[1\]\['lr'\]"),
    ("lr", torch.tensor(float("nan")), r"param_groups\[1\]\['lr'\].*nan"),
    ("lr", torch.tensor([1e-3, 1e-3]), r"param_groups\[1\]\['lr'\].*one element"),
    ("eps", -1.0, r"param_groups\[1\]\['eps'\]"),
    ("weight_decay", -0.1, r"param_groups\[1\]\['weight_decay'\]"),
    ("betas", (0.9, 1.0), r"param_groups\[1\]\['betas'\]\[1\]"),
    ("betas", (0.9, 0.99, 0.5), r"param_groups\[1\]\['betas'\]"),
]


@pytest.mark.parametrize("key,value,match", BAD_GROUP_VALUES,
                         ids=["lr-neg", "lr-nan", "lr-tensor-neg", "lr-tensor-nan", "lr-2-elements", "eps",
                              "weight_decay", "beta2-one", "betas-of-three"])
def test_bad_group_hyperparameter_steps_nothing(key, value, match):
    net, opt = stepped_opt()
    params = net.params()
    feed(params, 600)
    opt.param_groups[1][key] = value
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_unchanged(opt, params, snap)


# Combinations the constructor refuses (or torch's dense AdamW functional refuses) set on a group
# afterwards: the step must still raise before the masked buckets of any group were stepped.
FLAG_CASES = {
    "tensor-lr-foreach": ({"foreach": True}, {"lr": torch.tensor(1e-3)}, r"lr"),
    "tensor-betas-foreach": ({"foreach": True}, {"betas": (torch.tensor(0.9), torch.tensor(0.999))}, r"beta"),
    "capturable-on-cpu": ({}, {"capturable": True}, r"capturable"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_group_flags_refused_by_dense_adamw_step_nothing(case):
    ctor_kw, group_kw, match = FLAG_CASES[case]
    net, opt = stepped_opt(**ctor_kw)
    params = net.params()
    feed(params, 650)
    opt.param_groups[1].update(group_kw)
    snap = snapshot(opt, params)
    with pytest.raises((ValueError, RuntimeError, AssertionError), match=match):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_capturable_with_cpu_dense_params_first_step_changes_nothing():
    net = Net()
    opt = make_opt(net, capturable=True)  # accepted, as torch.optim.AdamW accepts it
    params = net.params()
    feed(params, 1)
    snap = snapshot(opt, params)
    with pytest.raises((ValueError, RuntimeError, AssertionError), match="capturable"):
        opt.step()
    assert_unchanged(opt, params, snap)


# ------------------------------------------------------------------------------------------
# the constructor
# ------------------------------------------------------------------------------------------
def _ctor(case: str, net: Net):
    ps = net.params()
    masks = default_masks(net)
    if case == "lr-tensor-neg":
        return lambda: MaskedAdamW(ps, lr=torch.tensor(-1e-3), masks=masks)
    if case == "lr-tensor-nan":
        return lambda: MaskedAdamW(ps, lr=torch.tensor(float("nan")), masks=masks)
    if case == "lr-tensor-2":
        return lambda: MaskedAdamW(ps, lr=torch.tensor([1e-3, 1e-3]), masks=masks)
    if case == "betas-mixed":
        return lambda: MaskedAdamW(ps, betas=(0.9, torch.tensor(0.999)), masks=masks)
    if case == "betas-mixed-2":
        return lambda: MaskedAdamW(ps, betas=(torch.tensor(0.9), 0.999), masks=masks)
    if case == "fused-foreach":
        return lambda: MaskedAdamW(ps, fused=True, foreach=True, masks=masks)
    if case == "differentiable":
        return lambda: MaskedAdamW(ps, differentiable=True, masks=masks)
    if case == "twice-plain":
        return lambda: MaskedAdamW([net.w0, net.b0, net.w0], masks={})
    if case == "twice-named":
        return lambda: MaskedAdamW([("w0", net.w0), ("b0", net.b0), ("w0", net.w0)], masks={})
    if case == "twice-in-group-dict":
        return lambda: MaskedAdamW([{"params": [net.w0]}, {"params": [net.w1, net.w1]}])
    if case == "two-groups":
        return lambda: MaskedAdamW([{"params": [net.w0, net.b0]}, {"params": [net.w1, net.w0]}])
    raise AssertionError(case)


CTOR_CASES = [
    ("lr-tensor-neg", ValueError, r"^lr: .*-0\.001"),
    ("lr-tensor-nan", ValueError, r"^lr: .*nan"),
    ("lr-tensor-2", ValueError, r"^lr: .*1-element"),
    ("betas-mixed", ValueError, r"^betas: .*both"),
    ("betas-mixed-2", ValueError, r"^betas: .*both"),
    ("fused-foreach", RuntimeError, r"fused.*foreach"),
    ("differentiable", NotImplementedError, r"differentiable"),
    ("twice-plain", ValueError, r"params\[2\] \(shape \(37, 19\)\) appears twice in param group 0"),
    ("twice-named", ValueError, r"'w0' appears twice in param group 0"),
    ("twice-in-group-dict", ValueError, r"params\[1\] \(shape \(5, 7, 3\)\) appears twice in param group 1"),
    ("two-groups", ValueError, r"more than one parameter group"),
]


@pytest.mark.parametrize("case,exc,match", CTOR_CASES, ids=[c[0] for c in CTOR_CASES])
def test_constructor_refuses(case, exc, match):
    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    build = _ctor(case, net)
    with pytest.raises(exc, match=match):
        build()
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p.detach(), b)
        assert p.grad is None


def test_add_param_group_refuses_a_known_or_repeated_param():
    net, opt = stepped_opt()
    params = net.params()
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [net.b0]})
    assert_unchanged(opt, params, snap)
    with pytest.raises(ValueError, match=r"'frozen' appears twice in param group 2"):
        opt.add_param_group({"params": [("frozen", net.frozen), ("frozen", net.frozen)]})
    assert_unchanged(opt, params, snap)


# ------------------------------------------------------------------------------------------
# masks: in the constructor and in set_masks
# ------------------------------------------------------------------------------------------
def _bad_masks(case: str, net: Net):
    """(masks with one bad entry among good ones, needs model=, expected exception, match)."""
    good = {net.w0: rand_mask(net.w0.numel(), 50)}
    n = net.w1.numel()
    base = rand_mask(n, 12)
    if case == "out-of-range":
        bad = torch.cat([base[:-1], torch.tensor([n], dtype=torch.int32)])
        return {**good, net.w1: bad}, IndexError, r"'w1'.*out of range"
    if case == "negative":
        bad = torch.cat([torch.tensor([-1], dtype=torch.int32), base[1:]])
        return {**good, net.w1: bad}, IndexError, r"'w1'.*out of range"
    if case == "unsorted":
        bad = base.clone()
        bad[[2, 3]] = bad[[3, 2]]
        return {**good, net.w1: bad}, ValueError, r"'w1'.*sorted"
    if case == "duplicate":
        bad = base.clone()
        bad[4] = bad[3]
        return {**good, net.w1: bad}, ValueError, r"'w1'.*(sorted and unique|unique)"
    if case == "float":
        return {**good, net.w1: base.float()}, TypeError, r"'w1'.*integer"
    if case == "2-D":
        return {**good, net.w1: base.reshape(3, 4)}, ValueError, r"'w1'.*1-D"
    if case == "foreign-param":
        return {**good, net.frozen: rand_mask(net.frozen.numel(), 5)}, ValueError, r"'frozen'.*not among"
    if case == "maskset-without-model":
        return fastmask.select({"w1": torch.rand(5, 7, 3)}, density=0.2), ValueError, r"MaskSet.*model="
    raise AssertionError(case)


MASK_CASES = ["out-of-range", "negative", "unsorted", "duplicate", "float", "2-D", "foreign-param",
              "maskset-without-model"]


@pytest.mark.parametrize("case", MASK_CASES)
def test_bad_mask_in_constructor(case):
    net = Net()
    masks, exc, match = _bad_masks(case, net)
    before = [p.detach().clone() for p in net.parameters()]
    model = None if case == "maskset-without-model" else net
    with pytest.raises(exc, match=match):
        MaskedAdamW(groups_of(net), masks=masks, model=model)
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("case", MASK_CASES)
def test_bad_mask_in_set_masks_keeps_old_masks_and_state(case):
    net, opt = stepped_opt()
    params = net.params()
    masks, exc, match = _bad_masks(case, net)
    snap = snapshot(opt, params)
    with pytest.raises(exc, match=match):
        opt.set_masks(masks)  # names come from the model given at construction
    assert_unchanged(opt, params, snap)
    assert float(opt.state[net.w0]["step"]) == 2 and float(opt.state[net.w1]["step"]) == 2
    # and the optimizer still steps as before
    good_steps(opt, params, 1, seed=900)
    assert float(opt.state[net.w1]["step"]) == 3


# ------------------------------------------------------------------------------------------
# load_state_dict: foreign or damaged state is refused before anything is written
# ------------------------------------------------------------------------------------------
LOAD_CASES = ["other-masks", "fewer-entries", "mask-where-dense", "groups", "truncated-exp_avg-masked",
              "truncated-exp_avg-dense", "truncated-exp_avg_sq-masked", "param_shape",
              # damaged entries that pass a count check but cannot be copied into the state
              "step-2-elements-masked", "step-none-masked", "exp_avg-k-by-1-masked", "step-none-dense",
              "exp_avg-list-dense"]


@pytest.mark.parametrize("case", LOAD_CASES)
def test_load_state_dict_refuses_foreign_state(case):
    net, opt = stepped_opt()
    params = net.params()
    masks = dict(opt.masks)
    src_net = Net(seed=3)  # same shapes, other values; its optimizer runs other steps
    m = {src_net.w0: masks[net.w0].clone(), src_net.w1: masks[net.w1].clone()}
    if case == "other-masks":
        m[src_net.w1] = rand_mask(src_net.w1.numel(), masks[net.w1].numel())
        assert not torch.equal(m[src_net.w1], masks[net.w1])
    elif case == "fewer-entries":
        m[src_net.w0] = m[src_net.w0][:-1]
    elif case == "mask-where-dense":
        m[src_net.b0] = rand_mask(64, 9)
    if case == "groups":
        src = MaskedAdamW(src_net.params(), masks=m, lr=2e-2)
    else:
        src = make_opt(src_net, m, lr=2e-2)
    good_steps(src, src_net.params(), 3, seed=300)
    sd = clone_tree(src.state_dict())  # never edit a live state dict: its dicts are the optimizer's
    if case.startswith("truncated"):
        key = "exp_avg_sq" if "exp_avg_sq" in case else "exp_avg"
        i = 2 if case.endswith("masked") else 3  # w1 or b1: the params of group 0 come first
        sd["state"][i][key] = sd["state"][i][key].reshape(-1)[:-1].clone()
    elif case == "param_shape":
        sd["state"][2]["param_shape"] = torch.tensor([7, 5, 3])
    elif case == "step-2-elements-masked":
        sd["state"][2]["step"] = torch.tensor([3.0, 3.0])
    elif case == "step-none-masked":
        sd["state"][2]["step"] = None
    elif case == "exp_avg-k-by-1-masked":  # the right number of entries, not a flat vector
        sd["state"][2]["exp_avg"] = sd["state"][2]["exp_avg"].reshape(-1, 1)
    elif case == "step-none-dense":
        sd["state"][3]["step"] = None
    elif case == "exp_avg-list-dense":
        sd["state"][3]["exp_avg"] = sd["state"][3]["exp_avg"].tolist()
    both = r"(?s)^(?=.*'{}')(?=.*{})"
    match = {
        "other-masks": r"'w1'.*different masks",
        "fewer-entries": r"'w0'.*different masks",
        "mask-where-dense": r"mask for 'b0'.*densely",
        "groups": r"1 parameter groups.*2",
        "truncated-exp_avg-masked": r"'exp_avg' for 'w1'",
        "truncated-exp_avg_sq-masked": r"'exp_avg_sq' for 'w1'",
        "truncated-exp_avg-dense": r"'exp_avg' for 'b1'",
        "param_shape": r"'w1'.*shape \(7, 5, 3\)",
        "step-2-elements-masked": both.format("w1", "step"),
        "step-none-masked": both.format("w1", "step"),
        "exp_avg-k-by-1-masked": both.format("w1", "exp_avg"),
        "step-none-dense": both.format("b1", "step"),
        "exp_avg-list-dense": both.format("b1", "exp_avg"),
    }[case]
    exc = ValueError if case in LOAD_CASES[:8] else (ValueError, TypeError)
    snap = snapshot(opt, params)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(opt, params, snap)


# ------------------------------------------------------------------------------------------
# an optimizer built without masks adopts the saved ones
# ------------------------------------------------------------------------------------------
def _twins():
    net = Net()
    opt = make_opt(net, lr=1e-2, amsgrad=True)
    good_steps(opt, net.params(), 3, seed=10)
    net2 = Net(seed=5)
    plain = MaskedAdamW(groups_of(net2), lr=1e-2, weight_decay=0.1, amsgrad=True)  # no masks, no model
    good_steps(plain, net2.params(), 2, seed=20)
    return net, opt, net2, plain


def test_unmasked_optimizer_adopts_saved_masks():
    net, opt, net2, plain = _twins()
    assert plain.masks == {}
    with torch.no_grad():
        for p, q in zip(net.params(), net2.params()):
            q.copy_(p)
    plain.load_state_dict(clone_tree(opt.state_dict()))
    got = plain.masks
    assert [tuple(p.shape) for p in got] == [tuple(p.shape) for p in opt.masks]
    assert set(map(id, got)) == {id(net2.w0), id(net2.w1)}
    for p, q in [(net.w0, net2.w0), (net.w1, net2.w1)]:
        assert torch.equal(got[q], opt.masks[p])
    for step in range(5):
        feed(net.params(), 40 + step)
        feed(net2.params(), 40 + step)
        opt.step()
        plain.step()
    for p, q in zip(net.params(), net2.params()):
        assert torch.equal(p, q)
    assert_same_tree(opt.state_dict()["state"], plain.state_dict()["state"], "state")


@pytest.mark.parametrize("case", ["out-of-range", "negative", "unsorted"])
def test_adopted_bad_mask_is_refused(case):
    net, opt, net2, plain = _twins()
    sd = clone_tree(opt.state_dict())
    idx = sd["state"][0]["mask_indices"]
    if case == "out-of-range":
        idx[-1] = net.w0.numel() + 5
    elif case == "negative":
        idx[0] = -3
    else:
        idx[[1, 2]] = idx[[2, 1]]
    params = net2.params()
    snap = snapshot(plain, params)
    exc, match = (ValueError, "sorted") if case == "unsorted" else (IndexError, "out of range")
    with pytest.raises(exc, match=rf"mask_indices.*\(37, 19\).*{match}"):
        plain.load_state_dict(sd)
    assert_unchanged(plain, params, snap)
    assert plain.masks == {}


# ------------------------------------------------------------------------------------------
# param_names travel with the state dict, as with torch.optim.AdamW
# ------------------------------------------------------------------------------------------
def _names_after_load(cls, src_named: bool, dst_named: bool, idx0=None, idx1=None):
    src_net, dst_net = Net(1), Net(2)

    def kw(net):
        return {"masks": {net.w0: idx0, net.w1: idx1}} if cls is MaskedAdamW else {}

    src = cls(groups_of(src_net, named=src_named), lr=1e-2, **kw(src_net))
    good_steps(src, src_net.params(), 1)
    dst = cls(groups_of(dst_net, named=dst_named), lr=1e-2, **kw(dst_net))
    dst.load_state_dict(src.state_dict())
    return [g.get("param_names") for g in dst.param_groups]


@pytest.mark.parametrize("src_named,dst_named", [(True, False), (False, True), (True, True)],
                         ids=["named-into-plain", "plain-into-named", "named-into-named"])
def test_param_names_survive_load_like_adamw(src_named, dst_named):
    expected = _names_after_load(torch.optim.AdamW, src_named, dst_named)
    assert expected == [["w0", "b0"], ["w1", "b1"]]  # what torch does
    got = _names_after_load(MaskedAdamW, src_named, dst_named, rand_mask(37 * 19, 40), rand_mask(5 * 7 * 3, 11))
    assert got == expected


def test_loaded_names_are_used_in_errors():
    src_net, dst_net = Net(1), Net(2)
    masks = default_masks(src_net)
    src = MaskedAdamW(groups_of(src_net, named=True), masks=masks)
    good_steps(src, src_net.params(), 1)
    dst = MaskedAdamW(groups_of(dst_net), masks={dst_net.w0: masks[src_net.w0], dst_net.w1: masks[src_net.w1]})
    dst.load_state_dict(src.state_dict())
    feed(dst_net.params(), 3)
    _bad_grad(dst_net.w1, "shape")
    with pytest.raises(ValueError, match=r"grad of 'w1'"):
        dst.step()


# ------------------------------------------------------------------------------------------
# index buffers corrupted without bumping the version counter
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["data", "numpy"])
@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_corrupted_index_buffer_raises_and_writes_nothing_outside(backend, how):
    buf = torch.randn(200)
    p1 = nn.Parameter(buf[:100])  # p1 and p2 share buf's storage: p2 lies right after p1
    p2 = nn.Parameter(buf[100:])
    w = nn.Parameter(torch.randn(37, 19))
    assert p1.data_ptr() == buf.data_ptr() and p2.data_ptr() == buf.data_ptr() + 100 * buf.element_size()
    opt = MaskedAdamW([p1, w, p2], lr=1e-2, weight_decay=0.1,
                      masks={p1: rand_mask(100, 30), w: rand_mask(w.numel(), 70)})
    with fastmask.backends.use(backend):
        good_steps(opt, [p1, w], 2)  # p2 never has a gradient: nothing may ever write it
        p2_before, buf_before = p2.detach().clone(), buf.clone()
        idx = opt.masks[p1]
        version = idx._version
        if how == "data":
            idx.data[-1] = p1.numel() + 5  # would land on p2[5]
        else:
            idx.numpy()[-1] = p1.numel() + 5
        assert idx._version == version and int(idx[-1]) == 105  # the write went past the version counter
        feed([p1, w], 77)
        with pytest.raises(IndexError, match=r"idx|index"):
            opt.step()
    assert torch.equal(p2.detach(), p2_before)
    assert torch.equal(buf[100:], buf_before[100:])
    assert p2.grad is None


# ------------------------------------------------------------------------------------------
# inference mode, meta parameters
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["params-outside", "all-inside"])
def test_inference_mode(where):
    def build():
        p = nn.Parameter(torch.randn(37, 19))
        d = nn.Parameter(torch.randn(13))
        return p, d

    if where == "params-outside":
        p, d = build()
    with torch.inference_mode():
        if where == "all-inside":
            p, d = build()
        idx = rand_mask(p.numel(), 70)
        before = p.detach().clone()
        d_before = d.detach().clone()
        try:
            opt = MaskedAdamW([p, d], lr=1e-2, weight_decay=0.1, masks={p: idx})
            for s in range(3):
                feed([p, d], s)
                opt.step()
        except Exception as exc:  # a clear error is acceptable; torch's internal one is not
            assert "version counter" not in str(exc), exc
            assert "inference" in str(exc).lower(), exc
            return
    keep = torch.ones(p.numel(), dtype=torch.bool)
    keep[idx.long()] = False
    assert torch.equal(p.detach().reshape(-1)[keep], before.reshape(-1)[keep])
    assert not torch.equal(p.detach().reshape(-1)[~keep], before.reshape(-1)[~keep])
    assert not torch.equal(d.detach(), d_before)
    assert float(opt.state[p]["step"]) == 3


def test_masks_on_meta_parameters_build():
    p = nn.Parameter(torch.empty(8, 4, device="meta"))
    opt = MaskedAdamW([p], masks={p: torch.tensor([1, 5])})
    m = opt.masks[p]
    assert m.device.type == "meta" and m.shape == (2,) and m.dtype == torch.int32
    assert opt.state[p]["exp_avg"].shape == (2,)


def test_meta_mask_out_of_range_is_still_caught_when_indices_are_real():
    p = nn.Parameter(torch.empty(8, 4, device="meta"))
    with pytest.raises(IndexError, match=r"out of range"):
        MaskedAdamW([p], masks={p: torch.tensor([1, 32])})


# ------------------------------------------------------------------------------------------
# layouts and dtypes that are accepted
# ------------------------------------------------------------------------------------------
def _odd_param(kind: str, base: torch.Tensor) -> nn.Parameter:
    if kind == "transposed":
        return nn.Parameter(torch.randn(19, 37).t())
    if kind == "sliced":  # columns 3..21 of base: the other columns are not the parameter's
        return nn.Parameter(base[:, 3:22])
    if kind == "channels_last":
        return nn.Parameter(torch.randn(6, 5, 7, 3).to(memory_format=torch.channels_last))
    if kind == "float64":
        return nn.Parameter(torch.randn(5, 7, 3, dtype=torch.float64))
    if kind == "complex64":
        return nn.Parameter(torch.randn(37, 19, dtype=torch.complex64))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["transposed", "sliced", "channels_last", "float64", "complex64"])
def test_odd_layouts_and_dtypes_are_accepted(kind):
    base = torch.randn(37, 40)
    p = _odd_param(kind, base)
    base_before = base.clone()
    dense = nn.Parameter(torch.randn(64))
    idx = rand_mask(p.numel(), p.numel() // 7)
    opt = MaskedAdamW([p, dense], lr=1e-2, weight_decay=0.1, masks={p: idx})
    before = p.detach().clone()
    for s in range(2):
        p.grad = torch.randn_like(p)
        dense.grad = torch.randn_like(dense)
        opt.step()
    keep = torch.ones(p.numel(), dtype=torch.bool)
    keep[idx.long()] = False
    after, prev = p.detach().reshape(-1), before.reshape(-1)
    assert torch.equal(after[keep], prev[keep])
    assert bool((after[~keep] != prev[~keep]).all())
    assert float(opt.state[p]["step"]) == 2
    outside = torch.ones(base.shape, dtype=torch.bool)
    if kind == "sliced":
        outside[:, 3:22] = False
    assert torch.equal(base[outside], base_before[outside])


# ------------------------------------------------------------------------------------------
# deepcopy and pickle
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_steps_like_the_original(how):
    net = Net()
    params = net.params()
    opt = make_opt(net, amsgrad=True, track_scores="abs")
    good_steps(opt, params, 2)
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    # the copy's state is keyed by the copy's params, on its own storage
    assert set(map(id, opt2.masks)) == {id(params2[0]), id(params2[2])}
    assert all(id(p) in set(map(id, params2)) for p in opt2.state)
    for (p, m), (q, m2) in zip(opt.masks.items(), opt2.masks.items()):
        assert torch.equal(m, m2) and m.data_ptr() != m2.data_ptr()
    assert_same_tree(clone_tree(opt.state_dict()), opt2.state_dict(), "copied state_dict")
    for step in range(3):
        feed(params, 50 + step)
        feed(params2, 50 + step)
        opt.step()
        opt2.step()
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
        assert p.data_ptr() != q.data_ptr()
    assert_same_tree(clone_tree(opt.state_dict()), opt2.state_dict(), "state_dict after 3 steps")
    assert float(opt2.state[params2[0]]["step"]) == 5
    scores, scores2 = opt.scores(), opt2.scores()
    assert scores.keys() == scores2.keys() == {"w0", "w1"}
    for k in scores:
        assert torch.equal(scores[k], scores2[k])
