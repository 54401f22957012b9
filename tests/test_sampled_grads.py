"""fastmask.ops.sampled_weight_grad (every backend that has it) and fastmask.sampled_weight_grads.

Tolerance: the selected entries of ``grad_out.T @ input`` are sums of ``T`` products; every backend
sums in float32 (float64 for float64 inputs), in its own order. Compared with the float64 product
of the same (dtype-rounded) inputs, each entry must be within the worst-case bound of a float32
summation, ``T * 2**-23 * sum_t |grad_out[t, r] * input[t, c]|`` (``2**-52`` for float64 inputs);
a wrong entry (another row or column, a missing term) is off by far more.
"""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn

import fastmask
from fastmask import MaskedAdamW, backends, ops

from .utils import random_indices

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [(1, 13, 9), (7, 5, 3), (33, 29, 17), (128, 64, 48)]  # (T, out, in)


def _backends_with_op():
    # Every backend with a CPU kernel for the op, Triton's under its interpreter included (forced:
    # it is in no CPU preference list).
    out = []
    for name in backends.names():
        if backends.why_not_call(name, "cpu", backends.Call(dtype=torch.float32, op="sampled_weight_grad")) is None:
            out.append(name)
    return out


BACKENDS = _backends_with_op()


def _bound(g, x, idx, dtype):
    n_in = x.shape[1]
    q = idx.long()
    a = g.double().abs().t()[q // n_in]
    b = x.double().abs().t()[q % n_in]
    eps = 2.0 ** -52 if dtype == torch.float64 else 2.0 ** -23
    return g.shape[0] * eps * (a * b).sum(1) + 1e-300


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_matches_the_dense_product_at_the_selected_entries(backend, dtype, size, density):
    T, n_out, n_in = size
    g = torch.Generator().manual_seed(T * 1000 + n_out)
    grad_out = torch.randn(T, n_out, generator=g).to(dtype)
    x = torch.randn(T, n_in, generator=g).to(dtype)
    idx = random_indices(n_out * n_in, int(density * n_out * n_in), g)
    if backend != "reference" and dtype == torch.float64:  # the compiled kernel sums in float32 only
        with backends.use(backend), pytest.raises(RuntimeError, match="cannot run this call"):
            ops.sampled_weight_grad(grad_out, x, idx)
        return
    with backends.use(backend):
        got = ops.sampled_weight_grad(grad_out, x, idx)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == idx.shape
    want = (grad_out.double().t() @ x.double()).reshape(-1)[idx.long()]
    err = (got.double() - want).abs()
    assert bool((err <= _bound(grad_out, x, idx, dtype)).all()), f"max error {err.max()}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 15, 2**31 - 1], ids=["neg", "past_end", "far"])
def test_out_of_range_index_raises(backend, bad):
    grad_out, x = torch.randn(4, 5), torch.randn(4, 3)
    idx = torch.tensor([0, 7, bad], dtype=torch.int32)
    with backends.use(backend), pytest.raises(IndexError, match="idx:"):
        ops.sampled_weight_grad(grad_out, x, idx)


@pytest.mark.parametrize("args,match,exc", [
    ((torch.randn(4, 5, 1), torch.randn(4, 3), torch.zeros(1, dtype=torch.int32)), "grad_out, input", ValueError),
    ((torch.randn(4, 5), torch.randn(3, 3), torch.zeros(1, dtype=torch.int32)), "input: 3 rows", ValueError),
    ((torch.randn(4, 5), torch.randn(4, 3).double(), torch.zeros(1, dtype=torch.int32)), "input: dtype", TypeError),
    ((torch.randn(4, 5), torch.randn(4, 3), torch.zeros(1, dtype=torch.int64)), "idx: expected a 1-D int32", TypeError),
    ((torch.randint(0, 3, (4, 5)), torch.randint(0, 3, (4, 3)), torch.zeros(1, dtype=torch.int32)), "grad_out", TypeError),
], ids=["3d", "rows", "dtype", "idx_dtype", "int"])
def test_bad_arguments_name_the_argument(args, match, exc):
    with pytest.raises(exc, match=match):
        ops.sampled_weight_grad(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(6, 5, generator=g), torch.randn(6, 4, generator=g), random_indices(20, 7, g))
    with backends.use(backend):
        torch.library.opcheck(torch.ops.fastmask.sampled_weight_grad.default, args)


def test_fake_kernel_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = ops.sampled_weight_grad(torch.randn(4, 5, dtype=torch.bfloat16), torch.randn(4, 3, dtype=torch.bfloat16),
                                      torch.zeros(6, dtype=torch.int32))
    assert out.shape == (6,) and out.dtype == torch.float32


# ------------------------------------------------------------------------------------------
# sampled_weight_grads: the layers of a model
# ------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.up = nn.Linear(11, 37, dtype=dtype)
        self.gate = nn.Linear(11, 37, bias=False, dtype=dtype)
        self.down = nn.Linear(37, 11, dtype=dtype)
        self.norm = nn.LayerNorm(11, dtype=dtype)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def _setup(dtype=torch.float32, density=0.1, seed=0, **kw):
    torch.manual_seed(seed)
    model = MLP(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    masks = {m.weight: random_indices(m.weight.numel(), int(density * m.weight.numel()), g)
             for m in (model.up, model.gate, model.down)}
    return model, MaskedAdamW(model.parameters(), lr=1e-2, masks=masks, model=model, **kw)


def _data(i, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(3, 5, 11, generator=g).to(dtype)  # 3-D input: tokens folded inside


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradients_match_autograd(dtype):
    model, opt = _setup(dtype)
    ref = copy.deepcopy(model)
    x = _data(0, dtype)
    ref(x).float().pow(2).sum().backward()
    with fastmask.sampled_weight_grads(model, opt) as handle:
        assert sorted(handle.layers) == ["down", "gate", "up"] and handle.skipped == []
        model(x).float().pow(2).sum().backward()
    masks = opt.masks
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p in masks:
            sel = masks[p].long()
            got, want = p.grad.reshape(-1), q.grad.reshape(-1)
            keep = torch.ones_like(got, dtype=torch.bool)
            keep[sel] = False
            assert bool((got[keep] == 0).all()), f"{name}: unselected entries must get no gradient"
            tol = 1e-5 if dtype == torch.float32 else 2e-2  # the dense bf16 product is rounded to bf16 itself
            torch.testing.assert_close(got[sel].float(), want[sel].float(), rtol=tol, atol=tol)
        else:  # biases, the norm: computed as nn.Linear / autograd compute them
            assert torch.equal(p.grad, q.grad), name


def test_training_matches_dense_gradients_and_keeps_unselected_entries():
    """20 steps with the step in backward: the selected entries follow dense-gradient training to
    float32 rounding; unselected entries stay bit-exact; the input to the layers gets its usual
    gradient (the LayerNorm, not masked, trains identically up to the same rounding)."""
    a, oa = _setup(step_in_backward=True)
    b, ob = _setup(step_in_backward=True)
    before = {n: p.detach().clone() for n, p in b.named_parameters()}
    handle = fastmask.sampled_weight_grads(b, ob)
    for i in range(20):
        x = _data(i)
        a(x).pow(2).mean().backward()
        b(x).pow(2).mean().backward()
    handle.remove()
    masks = ob.masks
    for (name, p), q in zip(b.named_parameters(), a.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
        if p in masks:
            keep = torch.ones(p.numel(), dtype=torch.bool)
            keep[masks[p].long()] = False
            assert torch.equal(p.detach().reshape(-1)[keep], before[name].reshape(-1)[keep]), name


def test_score_computes_whole_gradients_and_steps_nothing():
    """fastmask.score on a model under sampled_weight_grads, whose optimizer steps in backward:
    the same scores as without, and no parameter changes."""
    model, opt = _setup(step_in_backward=True)
    plain = copy.deepcopy(model)
    batches = [_data(i) for i in range(3)]

    def loss_fn(m, x):
        return m(x).pow(2).mean()

    targets = {"up.weight": model.up.weight, "gate.weight": model.gate.weight, "down.weight": model.down.weight}
    want = fastmask.score(plain, batches, loss_fn, targets=list(targets), progress=False)
    before = [p.detach().clone() for p in model.parameters()]
    with fastmask.sampled_weight_grads(model, opt):
        got = fastmask.score(model, batches, loss_fn, targets=list(targets), progress=False)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_follows_set_masks_and_remove_restores():
    model, opt = _setup()
    handle = fastmask.sampled_weight_grads(model, opt)
    g = torch.Generator().manual_seed(9)
    new = {m.weight: random_indices(m.weight.numel(), 5, g) for m in (model.up, model.gate, model.down)}
    opt.set_masks(new)
    model(_data(0)).sum().backward()
    for p, idx in new.items():
        assert int((p.grad != 0).sum()) <= 5 and bool((p.grad.reshape(-1)[idx.long()] != 0).all())
    handle.remove()
    assert "forward" not in model.up.__dict__
    model.zero_grad()
    model(_data(0)).sum().backward()
    assert int((model.up.weight.grad != 0).sum()) > 5  # whole gradients again


def test_no_grad_and_frozen_weights_take_the_plain_path():
    model, opt = _setup()
    with fastmask.sampled_weight_grads(model, opt):
        with torch.no_grad():
            y = model(_data(0))
        assert y.grad_fn is None
        torch.testing.assert_close(y, copy.deepcopy(model)(_data(0)).detach())


def test_autocast_bf16():
    model, opt = _setup()
    ref = copy.deepcopy(model)
    x = _data(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref(x).float().pow(2).sum().backward()
    with fastmask.sampled_weight_grads(model, opt), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().pow(2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad.dtype == q.grad.dtype, name
        if p in opt.masks:
            sel = opt.masks[p].long()
            torch.testing.assert_close(p.grad.reshape(-1)[sel], q.grad.reshape(-1)[sel], rtol=2e-2, atol=2e-2)
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-2)


def test_errors_name_the_argument():
    model, opt = _setup()
    with pytest.raises(TypeError, match="optimizer: expected a fastmask.MaskedAdamW"):
        fastmask.sampled_weight_grads(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        fastmask.sampled_weight_grads({}, opt)
    _, tracking = _setup(track_scores="grad")
    with pytest.raises(ValueError, match="optimizer: it tracks scores"):
        fastmask.sampled_weight_grads(model, tracking)
    other = MLP()
    with pytest.raises(ValueError, match="model: none of its nn.Linear \\(or Hugging Face Conv1D\\) layers"):
        fastmask.sampled_weight_grads(other, opt)


def test_a_backend_without_the_op_is_skipped_and_reported(monkeypatch):
    """A backend with no sampled_weight_grad kernel: dispatch skips it, forcing it raises, report() says so."""
    mod = types.ModuleType("fastmask_test_backend_without_sampled")
    mod.why_not = lambda device_type: None
    mod.masked_adamw_step_ = mod.score_accumulate_ = lambda *args: None
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(backends._MODULES, "nosampled", mod.__name__)
    monkeypatch.setitem(backends.PREFERENCE, "cpu", ["nosampled", *backends.PREFERENCE["cpu"]])
    try:
        call = backends.Call(dtype=torch.float32, op="sampled_weight_grad")
        assert backends.why_not_call("nosampled", "cpu", call) == "no kernel for sampled_weight_grad"
        assert backends.pick("cpu", call) != "nosampled"
        assert backends.pick("cpu") == "nosampled"  # the masked step still goes there
        grad_out, x = torch.randn(3, 4), torch.randn(3, 2)
        idx = torch.tensor([1, 6], dtype=torch.int32)
        want = (grad_out.t() @ x).reshape(-1)[idx.long()]
        torch.testing.assert_close(ops.sampled_weight_grad(grad_out, x, idx), want)
        with backends.use("nosampled"), pytest.raises(RuntimeError, match="no kernel for sampled_weight_grad"):
            ops.sampled_weight_grad(grad_out, x, idx)
        assert "no kernel for sampled_weight_grad" in backends.report(("cpu",))
    finally:
        backends._loaded.pop("nosampled", None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_long_token_counts_and_strided_operands(backend, dtype):
    """More tokens than one tile of any kernel (700: not a multiple of a tile), ``grad_out`` a
    transposed view and ``input`` a column-strided view: read through their strides."""
    g = torch.Generator().manual_seed(11)
    T, n_out, n_in = 700, 9, 7
    grad_out = torch.randn(n_out, T, generator=g).to(dtype).t()
    x = torch.randn(T, 2 * n_in, generator=g).to(dtype)[:, ::2]
    assert not grad_out.is_contiguous() and not x.is_contiguous()
    idx = random_indices(n_out * n_in, 40, g)
    with backends.use(backend):
        got = ops.sampled_weight_grad(grad_out, x, idx)
    want = (grad_out.double().t() @ x.double()).reshape(-1)[idx.long()]
    assert bool(((got.double() - want).abs() <= _bound(grad_out, x, idx, dtype)).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_indices_are_counted_across_programs(backend):
    """1200 indices, the last 100 past the end, spread over several programs of a kernel: all counted."""
    grad_out, x = torch.randn(5, 100), torch.randn(5, 11)
    idx = torch.arange(1200, dtype=torch.int32)
    with backends.use(backend), pytest.raises(IndexError, match=r"idx: 100 indices are outside \[0, 1100\)"):
        ops.sampled_weight_grad(grad_out, x, idx)


def _cuda_backends_with_op():
    if not torch.cuda.is_available():
        return ["none"]
    return [n for n in backends.names()
            if backends.why_not_call(n, "cuda", backends.Call(dtype=torch.float32, op="sampled_weight_grad")) is None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("backend", _cuda_backends_with_op())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("size", [(128, 96, 80), (1000, 300, 70), (3, 5000, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_on_cuda_matches_the_dense_product(backend, dtype, size):
    """Every backend with a CUDA kernel for the op, against the float64 product, with no host
    sync (``set_sync_debug_mode("error")``: the op runs inside backward passes). The 5000 x 1000
    weight (5M entries) takes two of the ext's row chunks (2^22 entries each)."""
    T, n_out, n_in = size
    g = torch.Generator().manual_seed(5)
    grad_out = torch.randn(T, n_out, generator=g).to(dtype).cuda()
    x = torch.randn(T, n_in, generator=g).to(dtype).cuda()
    idx = random_indices(n_out * n_in, max(1, n_out * n_in // 20), g).cuda()
    with backends.use(backend):
        ops.sampled_weight_grad(grad_out, x, idx)  # warm-up (Triton compiles, cuBLAS loads)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = ops.sampled_weight_grad(grad_out, x, idx)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    want = (grad_out.double().t() @ x.double()).reshape(-1)[idx.long()]
    assert bool(((got.double() - want).abs() <= _bound(grad_out, x, idx, dtype)).all())


def test_gpt2_conv1d_layers():
    """Hugging Face GPT-2's Conv1D (weight stored [in, out]; the hf_gpt2 preset masks mlp.c_fc):
    selected entries match autograd's gradient, the others get none, everything else is unchanged."""
    import fastmask.compat

    fastmask.compat.patch_torchvision()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    ref = copy.deepcopy(model)
    targets = fastmask.find_targets(model, "hf_gpt2")
    g = torch.Generator().manual_seed(4)
    masks = {p: random_indices(p.numel(), p.numel() // 10, g) for p in targets.masked.values()}
    opt = MaskedAdamW(model.parameters(), lr=1e-3, masks=masks, model=model)
    ids = torch.randint(0, 97, (2, 16), generator=g)
    ref(input_ids=ids, labels=ids).loss.backward()
    with fastmask.sampled_weight_grads(model, opt) as handle:
        assert sorted(handle.layers) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
        model(input_ids=ids, labels=ids).loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p in masks:
            sel = masks[p].long()
            keep = torch.ones(p.numel(), dtype=torch.bool)
            keep[sel] = False
            assert bool((p.grad.reshape(-1)[keep] == 0).all()), name
            torch.testing.assert_close(p.grad.reshape(-1)[sel], q.grad.reshape(-1)[sel], rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert "forward" not in model.transformer.h[0].mlp.c_fc.__dict__
