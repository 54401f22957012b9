"""MaskedAdamW(step_in_backward=True) against the ordinary backward() + step().

The step in backward runs the same op per parameter as step() runs per bucket, so every result is
compared bit for bit (``torch.equal`` on parameters and on every state tensor), over 20 steps.
"""
from __future__ import annotations

import copy
import gc
import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastmask import MaskedAdamW
from fastmask import distributed as fm_dist

from .utils import random_indices

STEPS = 20


class Net(nn.Module):
    """Masked and dense parameters, a frozen one, a tied use, odd sizes; optional checkpointing."""

    def __init__(self, dtype=torch.float32, ckpt: str | None = None):
        super().__init__()
        self.fc1 = nn.Linear(13, 37, dtype=dtype)
        self.fc2 = nn.Linear(37, 29, dtype=dtype)
        self.head = nn.Linear(29, 5, dtype=dtype)
        self.frozen = nn.Linear(13, 13, dtype=dtype)
        self.frozen.requires_grad_(False)
        self.ckpt = ckpt

    def block(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.frozen(x) + x)))

    def forward(self, x):
        if self.ckpt is None:
            h = self.block(x)
        else:
            h = checkpoint(self.block, x, use_reentrant=self.ckpt == "reentrant")
        h = h + torch.tanh(self.fc2(torch.nn.functional.gelu(self.fc1(x))))  # fc1, fc2 used twice
        return self.head(h)


def _masks(model: Net, density=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {p: random_indices(p.numel(), max(1, int(density * p.numel())), g)
            for p in (model.fc1.weight, model.fc2.weight, model.head.weight)}


def _make(dtype=torch.float32, ckpt=None, seed=0):
    torch.manual_seed(seed)
    return Net(dtype, ckpt)


def _groups(model: Net, split: bool):
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not split:
        return trainable
    return [{"params": [model.fc1.weight, model.fc1.bias, model.head.weight]},
            {"params": [model.fc2.weight, model.fc2.bias, model.head.bias], "lr": 3e-3, "weight_decay": 0.05}]


def _batch(i, dtype, n=6):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(n, 13, generator=g).to(dtype), torch.randn(n, 5, generator=g).to(dtype)


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _assert_same(ma: nn.Module, mb: nn.Module, oa: MaskedAdamW, ob: MaskedAdamW) -> None:
    for (n, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(pa, pb), f"{n}: max diff {(pa.double() - pb.double()).abs().max()}"
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k, st in sa["state"].items():
        assert st.keys() == sb["state"][k].keys()
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][k][key])), (k, key)


def _pair(ckpt=None, **kw):
    """Two equal models: one for the ordinary step (oa), one stepping in backward (ob)."""
    ma, mb = _make(), _make(ckpt=ckpt)
    oa = MaskedAdamW(ma.parameters(), lr=1e-2, masks=_masks(ma), **kw)
    ob = MaskedAdamW(mb.parameters(), lr=1e-2, masks=_masks(mb), step_in_backward=True, **kw)
    return ma, oa, mb, ob


def _train(ma, oa, mb, ob, batches, device="cpu", input_grad=False):
    """The same batches through both: backward + step for oa, backward alone for ob."""
    for i in batches:
        x, y = (t.to(device) for t in _batch(i, torch.float32))
        x.requires_grad_(input_grad)  # a reentrant checkpoint needs an input that requires grad
        _loss(ma, x, y).backward()
        oa.step()
        oa.zero_grad()
        _loss(mb, x, y).backward()
        assert all(p.grad is None for p in mb.parameters()), "every gradient is freed inside backward()"


CONFIGS = {
    "fp32": dict(),
    "bf16": dict(dtype=torch.bfloat16),
    "fp64": dict(dtype=torch.float64),
    "groups+amsgrad+maximize": dict(split=True, opt=dict(amsgrad=True, maximize=True)),
    "decay_unselected+scores": dict(opt=dict(decay_unselected=True, track_scores="fisher", weight_decay=0.1)),
    "dense_foreach": dict(opt=dict(foreach=True)),
    "dense_fused": dict(opt=dict(fused=True)),
    "tensor_lr": dict(opt=dict(lr=torch.tensor(2e-3))),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_equals_ordinary_step_over_20_steps(name):
    cfg = CONFIGS[name]
    dtype = cfg.get("dtype", torch.float32)
    kw = {"lr": 1e-2, "weight_decay": 0.01, **cfg.get("opt", {})}
    ma, mb = _make(dtype), _make(dtype)
    oa = MaskedAdamW(_groups(ma, cfg.get("split", False)), masks=_masks(ma), model=ma, **kw)
    ob = MaskedAdamW(_groups(mb, cfg.get("split", False)), masks=_masks(mb), model=mb, step_in_backward=True,
                     **copy.deepcopy(kw))
    assert ob.step_in_backward and not oa.step_in_backward
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=5, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=5, gamma=0.5)
    frozen = mb.frozen.weight.clone()
    for i in range(STEPS):
        x, y = _batch(i, dtype)
        _loss(ma, x, y).backward()
        oa.step()
        oa.zero_grad()
        _loss(mb, x, y).backward()
        assert all(p.grad is None for p in mb.parameters()), "every gradient is freed inside backward()"
        ob.step()  # nothing left to step
        ob.zero_grad()
        sa.step()
        sb.step()
    _assert_same(ma, mb, oa, ob)
    assert torch.equal(mb.frozen.weight, frozen)
    if "track_scores" in kw:
        for k, v in oa.scores().items():
            assert torch.equal(v, ob.scores()[k]), k
    # unselected entries of masked weights are bit-exact (no decay_unselected) or decayed like oa's
    assert int(ob.state_dict()["state"][0]["step"]) == STEPS


@pytest.mark.parametrize("all_inside", [False, True], ids=["last_outside", "all_inside_then_step"])
def test_micro_batch_accumulation(all_inside):
    ma, mb = _make(), _make()
    oa = MaskedAdamW(ma.parameters(), lr=1e-2, masks=_masks(ma))
    ob = MaskedAdamW(mb.parameters(), lr=1e-2, masks=_masks(mb), step_in_backward=True)
    micro = 3
    for i in range(STEPS // 2):
        for j in range(micro):
            x, y = _batch(10 * i + j, torch.float32)
            (_loss(ma, x, y) / micro).backward()
            last = j == micro - 1
            if last and not all_inside:
                (_loss(mb, x, y) / micro).backward()
                assert all(p.grad is None for p in mb.parameters())
            else:
                with ob.accumulating():
                    (_loss(mb, x, y) / micro).backward()
                assert all(p.grad is not None for p in mb.parameters() if p.requires_grad)
        oa.step()
        oa.zero_grad()
        ob.step()
        ob.zero_grad()
    _assert_same(ma, mb, oa, ob)


class SegmentNet(Net):
    """Each parameter used in one checkpointed segment only (as in a transformer's layers)."""

    def forward(self, x):
        if self.ckpt is None:
            h = self.fc2(torch.nn.functional.gelu(self.fc1(self.frozen(x) + x)))
        else:
            h = checkpoint(lambda x: torch.nn.functional.gelu(self.fc1(self.frozen(x) + x)), x,
                           use_reentrant=self.ckpt == "reentrant")
            h = checkpoint(self.fc2, h, use_reentrant=self.ckpt == "reentrant")
        return self.head(h)


@pytest.mark.parametrize("cls,ckpt", [(Net, "non_reentrant"), (SegmentNet, "non_reentrant"), (SegmentNet, "reentrant")],
                         ids=["shared-non_reentrant", "per_segment-non_reentrant", "per_segment-reentrant"])
def test_gradient_checkpointing(cls, ckpt):
    """(A parameter shared by a reentrant segment and the rest is refused: see below.)"""
    torch.manual_seed(0)
    ma = cls(torch.float32, None)
    torch.manual_seed(0)
    mb = cls(torch.float32, ckpt)
    oa = MaskedAdamW(ma.parameters(), lr=1e-2, masks=_masks(ma))
    ob = MaskedAdamW(mb.parameters(), lr=1e-2, masks=_masks(mb), step_in_backward=True)
    _train(ma, oa, mb, ob, range(STEPS), input_grad=ckpt == "reentrant")
    _assert_same(ma, mb, oa, ob)


def test_at_most_one_gradient_exists_at_a_time(monkeypatch):
    model = _make()
    opt = MaskedAdamW(model.parameters(), lr=1e-2, masks=_masks(model), step_in_backward=True)
    seen = []
    original = MaskedAdamW._step_one

    def spy(self, p):
        seen.append(sum(q.grad is not None for q in model.parameters()))
        original(self, p)

    monkeypatch.setattr(MaskedAdamW, "_step_one", spy)
    for i in range(3):
        _loss(model, *_batch(i, torch.float32)).backward()
    trainable = sum(p.requires_grad for p in model.parameters())
    assert len(seen) == 3 * trainable
    assert max(seen) == 1


def test_per_tensor_clipping_hook_registered_first():
    """The documented alternative to global clipping: clip each gradient from a hook registered before
    the optimizer (hooks run in registration order), equal to clipping each tensor before step()."""
    ma, mb = _make(), _make()
    def clip(p: torch.Tensor) -> None:  # a post-accumulate-grad hook must return None
        torch.nn.utils.clip_grad_norm_([p], 0.05)

    for p in mb.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(clip)
    oa = MaskedAdamW(ma.parameters(), lr=1e-2, masks=_masks(ma))
    ob = MaskedAdamW(mb.parameters(), lr=1e-2, masks=_masks(mb), step_in_backward=True)
    for i in range(5):
        x, y = _batch(i, torch.float32)
        _loss(ma, x, y).backward()
        for p in ma.parameters():
            if p.grad is not None:
                torch.nn.utils.clip_grad_norm_([p], 0.05)
        oa.step()
        oa.zero_grad()
        _loss(mb, x, y).backward()
    _assert_same(ma, mb, oa, ob)


def test_grad_scaler_is_refused():
    model = _make()
    opt = MaskedAdamW(model.parameters(), lr=1e-2, masks=_masks(model), step_in_backward=True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(_loss(model, *_batch(0, torch.float32))).backward()
    with pytest.raises(RuntimeError, match="step_in_backward: torch.amp.GradScaler"):
        scaler.step(opt)


def test_refused_under_more_than_one_rank(monkeypatch):
    monkeypatch.setattr(fm_dist, "resolve_group", lambda group=None: object())
    model = _make()
    with pytest.raises(NotImplementedError, match="step_in_backward: not supported under torch.distributed"):
        MaskedAdamW(model.parameters(), masks=_masks(model), step_in_backward=True, verify_masks=False)


def test_argument_type_is_checked():
    model = _make()
    with pytest.raises(TypeError, match="step_in_backward: expected a bool"):
        MaskedAdamW(model.parameters(), step_in_backward="yes")


def test_state_dict_resume_and_set_masks():
    """A checkpoint of the step-in-backward optimizer resumes into an ordinary one and back; new masks
    take effect in the hooks at once."""
    ma, oa, mb, ob = _pair()
    _train(ma, oa, mb, ob, range(5))
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    mc = copy.deepcopy(mb)
    oc = MaskedAdamW(mc.parameters(), lr=1e-2, step_in_backward=True)  # adopts the saved masks
    oc.load_state_dict(torch.load(buf))
    oa.set_masks(_masks(ma, seed=7))
    ob.set_masks(_masks(mb, seed=7))
    oc.set_masks(_masks(mc, seed=7))
    for i in range(5, 10):
        x, y = _batch(i, torch.float32)
        _loss(ma, x, y).backward()
        oa.step()
        oa.zero_grad()
        _loss(mb, x, y).backward()
        _loss(mc, x, y).backward()
    _assert_same(ma, mb, oa, ob)
    _assert_same(ma, mc, oa, oc)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_step_their_own_parameters(how):
    model = _make()
    opt = MaskedAdamW(model.parameters(), lr=1e-2, masks=_masks(model), step_in_backward=True)
    _loss(model, *_batch(0, torch.float32)).backward()
    pair = (model, opt)
    model2, opt2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert opt2.step_in_backward
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(1, torch.float32)
    _loss(model2, x, y).backward()
    assert all(p.grad is None for p in model2.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "the copy stepped the original"
    _loss(model, x, y).backward()
    _assert_same(model, model2, opt, opt2)


def test_dropped_optimizer_stops_stepping():
    model = _make()
    opt = MaskedAdamW(model.parameters(), lr=1e-2, masks=_masks(model), step_in_backward=True)
    del opt
    gc.collect()
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, *_batch(0, torch.float32)).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_add_param_group_hooks_new_parameters():
    ma, mb = _make(), _make()
    oa = MaskedAdamW([ma.fc1.weight, ma.fc1.bias], lr=1e-2)
    ob = MaskedAdamW([mb.fc1.weight, mb.fc1.bias], lr=1e-2, step_in_backward=True)
    for o, m in ((oa, ma), (ob, mb)):
        o.add_param_group({"params": [m.fc2.weight, m.fc2.bias, m.head.weight, m.head.bias], "lr": 5e-3})
    _train(ma, oa, mb, ob, range(5))
    _assert_same(ma, mb, oa, ob)


def test_reentrant_checkpoint_with_a_parameter_also_used_outside_is_refused():
    """fc1/fc2 are used inside a reentrant checkpoint and outside it: their gradient arrives in two
    parts (the nested backward's and the outer one's); the second part raises instead of stepping
    again, and the next, ordinary backward works (the window was reset)."""
    model = _make(ckpt="reentrant")
    opt = MaskedAdamW(model.parameters(), lr=1e-2, masks=_masks(model), step_in_backward=True)
    x, y = _batch(0, torch.float32)
    with pytest.raises(RuntimeError, match="received a second gradient within one backward pass"):
        _loss(model, x.requires_grad_(), y).backward()
    model.ckpt = None
    model.zero_grad()
    _loss(model, x, y).backward()
    assert all(p.grad is None for p in model.parameters())


def test_a_loss_built_before_another_backward_is_not_silently_wrong():
    """Two losses built first, then backward on each: the first backward steps the weights the
    second graph saved, which autograd detects (as it would for an ordinary step in between)."""
    model = _make()
    opt = MaskedAdamW(model.parameters(), lr=1e-2, masks=_masks(model), step_in_backward=True)  # noqa: F841 (kept)
    losses = [_loss(model, *_batch(j, torch.float32)) for j in range(2)]
    losses[0].backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        losses[1].backward()


def test_a_constructor_that_raises_leaves_no_hooks():
    model = _make()
    bad = {model.fc1.weight: torch.tensor([0, model.fc1.weight.numel()])}  # out of range
    with pytest.raises(IndexError):
        MaskedAdamW(model.parameters(), masks=bad, step_in_backward=True)
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, *_batch(0, torch.float32)).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
def test_on_cuda_equals_ordinary_step():
    """On a GPU the hooks run on autograd's device thread: still bit-identical to backward() + step()."""
    ma, mb = _make().cuda(), _make().cuda()
    oa = MaskedAdamW(ma.parameters(), lr=1e-2, masks={p: i.cuda() for p, i in _masks(ma).items()})
    ob = MaskedAdamW(mb.parameters(), lr=1e-2, masks={p: i.cuda() for p, i in _masks(mb).items()},
                     step_in_backward=True)
    _train(ma, oa, mb, ob, range(STEPS), device="cuda")
    _assert_same(ma, mb, oa, ob)
