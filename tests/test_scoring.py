"""fastmask.score: each mode against a hand computation, targets forms, restoration, errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastmask import Targets, find_targets, score, scoring

from .utils import assert_close, clip_batches, clip_loss, tiny_open_clip

TARGET_NAMES = ["0.weight", "2.weight"]


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5), nn.Tanh(), nn.Linear(5, 3))


def mlp_batches(n: int = 5, b: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 7, generator=g), torch.randn(b, 3, generator=g)) for _ in range(n)]


def mlp_loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def hand_scores(model, batches, names, mode):
    """Plain autograd per batch with torch.autograd.grad, accumulated in fp64."""
    params = dict(model.named_parameters())
    acc = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    for batch in batches:
        loss = mlp_loss(model, batch)
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            g = g.double()
            acc[n] += {"grad": g, "abs": g.abs(), "fisher": g * g}[mode]
    if mode == "grad":
        acc = {n: a.abs() for n, a in acc.items()}
    return {n: a.float() for n, a in acc.items()}


@pytest.mark.parametrize("mode", ["grad", "abs", "fisher"])
def test_modes_match_hand_computation(mode):
    model = tiny_mlp()
    batches = mlp_batches(5)
    want = hand_scores(model, batches, TARGET_NAMES, mode)
    got = score(model, batches, mlp_loss, targets=TARGET_NAMES, mode=mode, progress=False)
    assert list(got) == TARGET_NAMES
    for n in TARGET_NAMES:
        assert got[n].dtype == torch.float32 and got[n].shape == dict(model.named_parameters())[n].shape, n
        assert bool((got[n] != 0).any()), f"{n}: all-zero score"
        assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, what=f"{mode} score of {n}")


def test_modes_differ_from_each_other():
    """grad (|sum g|) <= abs (sum |g|) entrywise, strictly somewhere with several batches."""
    model = tiny_mlp()
    batches = mlp_batches(6)
    g = score(model, batches, mlp_loss, targets=TARGET_NAMES, mode="grad", progress=False)
    a = score(model, batches, mlp_loss, targets=TARGET_NAMES, mode="abs", progress=False)
    for n in TARGET_NAMES:
        assert bool((g[n] <= a[n] * (1 + 1e-5) + 1e-8).all()), n
        assert bool((g[n] < a[n] * (1 - 1e-3)).any()), f"{n}: grad and abs scores coincide"


def test_max_batches():
    model = tiny_mlp()
    batches = mlp_batches(6)
    want = hand_scores(model, batches[:2], TARGET_NAMES, "fisher")
    seen = []

    def loss_fn(m, b):
        seen.append(b)
        return mlp_loss(m, b)

    got = score(model, iter(batches), loss_fn, targets=TARGET_NAMES, mode="fisher", max_batches=2, progress=False)
    assert len(seen) == 2, f"loss_fn called {len(seen)} times with max_batches=2"
    for n in TARGET_NAMES:
        assert_close(got[n], want[n], rtol=1e-5, atol=1e-9, what=n)


@pytest.mark.parametrize("bad", [0, -1], ids=["zero", "negative"])
def test_max_batches_invalid(bad):
    with pytest.raises(ValueError, match="max_batches"):
        score(tiny_mlp(), mlp_batches(2), mlp_loss, targets=TARGET_NAMES, max_batches=bad, progress=False)


def test_generator_batches():
    model = tiny_mlp()
    batches = mlp_batches(3)
    want = hand_scores(model, batches, TARGET_NAMES, "abs")
    got = score(model, (b for b in batches), mlp_loss, targets=TARGET_NAMES, mode="abs", progress=False)
    for n in TARGET_NAMES:
        assert_close(got[n], want[n], rtol=1e-5, atol=1e-8, what=n)


# ----------------------------------------------------------------------------------------------
# targets forms
# ----------------------------------------------------------------------------------------------
def test_targets_forms_on_mlp_agree():
    model = tiny_mlp()
    batches = mlp_batches(3)
    params = dict(model.named_parameters())
    ref = score(model, batches, mlp_loss, targets=TARGET_NAMES, progress=False)
    forms = {
        "dict": {n: params[n] for n in TARGET_NAMES},
        "Targets": Targets(masked={n: params[n] for n in TARGET_NAMES}, dense={"4.weight": params["4.weight"]}),
        "glob": ["[02].weight"],
        "Targets_from_find": find_targets(model, None, masked=["0.weight", "2.weight"], dense="4.*"),
    }
    for label, t in forms.items():
        got = score(model, batches, mlp_loss, targets=t, progress=False)
        assert list(got) == TARGET_NAMES, f"{label}: scored {list(got)}"
        for n in TARGET_NAMES:
            assert torch.equal(got[n], ref[n]), f"{label}: {n} differs"


@pytest.mark.parametrize("form", ["None", "preset_name", "Targets", "dict", "names"])
def test_targets_forms_on_open_clip(form):
    model = tiny_open_clip()
    batches = clip_batches(2)
    t = find_targets(model)
    arg = {"None": None, "preset_name": "open_clip", "Targets": t, "dict": dict(t.masked), "names": list(t.masked)}[form]
    got = score(model, batches, clip_loss, targets=arg, progress=False)
    assert list(got) == list(t.masked), f"{form}: scored {list(got)}"
    for n, p in t.masked.items():
        assert got[n].shape == p.shape and got[n].dtype == torch.float32
        assert bool((got[n] > 0).any()), f"{form}: {n} has an all-zero score"


def test_open_clip_scores_match_hand_computation():
    model = tiny_open_clip()
    batches = clip_batches(3)
    t = find_targets(model)
    names = list(t.masked)
    acc = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in t.masked.items()}
    for b in batches:
        grads = torch.autograd.grad(clip_loss(model, b), list(t.masked.values()))
        for n, g in zip(names, grads):
            acc[n] += g.double()
    got = score(model, batches, clip_loss, mode="grad", progress=False)
    for n in names:
        assert_close(got[n], acc[n].abs().float(), rtol=1e-4, atol=1e-7, what=n)


# ----------------------------------------------------------------------------------------------
# frozen params get no gradient; flags and grads restored
# ----------------------------------------------------------------------------------------------
def test_no_gradient_for_non_targets():
    model = tiny_mlp()
    fired = []
    non_targets = [(n, p) for n, p in model.named_parameters() if n not in TARGET_NAMES]
    for n, p in non_targets:
        assert p.requires_grad
        p.register_hook(lambda g, n=n: fired.append(n))
    score(model, mlp_batches(3), mlp_loss, targets=TARGET_NAMES, progress=False)
    assert not fired, f"gradients were computed for non-target parameters {sorted(set(fired))}"
    for n, p in non_targets:
        assert p.grad is None, f"{n}.grad was set"


def test_requires_grad_flags_restored_exactly():
    model = tiny_mlp()
    names = [n for n, _ in model.named_parameters()]
    pattern = {n: (i % 2 == 0) for i, n in enumerate(names)}
    pattern["2.weight"] = False  # a target that was frozen before
    for n, p in model.named_parameters():
        p.requires_grad_(pattern[n])
    score(model, mlp_batches(2), mlp_loss, targets=TARGET_NAMES, progress=False)
    after = {n: p.requires_grad for n, p in model.named_parameters()}
    assert after == pattern, f"requires_grad not restored: {after} != {pattern}"


def test_preexisting_grads_restored():
    model = tiny_mlp()
    params = dict(model.named_parameters())
    old = {n: torch.randn(params[n].shape) for n in ["0.weight", "4.bias"]}
    copies = {n: g.clone() for n, g in old.items()}
    for n, g in old.items():
        params[n].grad = g
    score(model, mlp_batches(3), mlp_loss, targets=TARGET_NAMES, progress=False)
    for n, g in old.items():
        assert params[n].grad is g, f"{n}.grad is not the same tensor object"
        assert torch.equal(params[n].grad, copies[n]), f"{n}.grad values changed"
    assert params["2.weight"].grad is None, "a target without a .grad before must have none after"


def test_restored_when_loss_fn_raises():
    model = tiny_mlp()
    params = dict(model.named_parameters())
    flags = {n: (i % 3 != 1) for i, n in enumerate(params)}
    for n, p in params.items():
        p.requires_grad_(flags[n])
    old_grad = torch.randn(params["0.weight"].shape)
    params["0.weight"].grad = old_grad
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in loss_fn")
        return mlp_loss(m, b)

    with pytest.raises(RuntimeError, match="boom in loss_fn"):
        score(model, mlp_batches(5), loss_fn, targets=TARGET_NAMES, progress=False)
    assert {n: p.requires_grad for n, p in params.items()} == flags
    assert params["0.weight"].grad is old_grad
    assert params["2.weight"].grad is None
    # no hook left behind: a later plain backward must leave a .grad on the targets
    for p in params.values():
        p.requires_grad_(True)
    params["0.weight"].grad = None
    mlp_loss(model, mlp_batches(1)[0]).backward()
    assert params["0.weight"].grad is not None and params["2.weight"].grad is not None, "a scoring hook was left registered"


def test_model_parameters_unchanged():
    model = tiny_mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    score(model, mlp_batches(3), mlp_loss, targets=TARGET_NAMES, progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------
def test_bad_mode():
    with pytest.raises(ValueError, match=r"mode.*'sum'"):
        score(tiny_mlp(), mlp_batches(1), mlp_loss, targets=TARGET_NAMES, mode="sum", progress=False)


def test_empty_batches():
    with pytest.raises(ValueError, match="no batch"):
        score(tiny_mlp(), [], mlp_loss, targets=TARGET_NAMES, progress=False)


def test_non_scalar_loss():
    with pytest.raises(TypeError, match="scalar"):
        score(tiny_mlp(), mlp_batches(1), lambda m, b: (m(b[0]) - b[1]) ** 2, targets=TARGET_NAMES, progress=False)


def test_non_tensor_loss():
    with pytest.raises(TypeError, match="scalar"):
        score(tiny_mlp(), mlp_batches(1), lambda m, b: 1.5, targets=TARGET_NAMES, progress=False)


def test_loss_independent_of_targets():
    with pytest.raises(ValueError, match="does not depend"):
        score(tiny_mlp(), mlp_batches(1), lambda m, b: (b[0] ** 2).sum(), targets=TARGET_NAMES, progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_loss(value):
    model = tiny_mlp()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite.*batch 1"):
        calls = []

        def loss_fn(m, b):
            calls.append(1)
            loss = mlp_loss(m, b)
            return loss * value if len(calls) == 2 else loss

        score(model, mlp_batches(3), loss_fn, targets=TARGET_NAMES, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_empty_targets():
    with pytest.raises(ValueError, match="targets"):
        score(tiny_mlp(), mlp_batches(1), mlp_loss, targets={}, progress=False)


def test_target_pattern_matching_nothing():
    with pytest.raises(ValueError, match="matches no parameter"):
        score(tiny_mlp(), mlp_batches(1), mlp_loss, targets=["*nothing*"], progress=False)


def test_unreached_target_warns_and_scores_zero():
    model = tiny_mlp()
    model.register_parameter("unused", nn.Parameter(torch.randn(3, 3)))  # not a module: never in forward
    with pytest.warns(UserWarning, match=r"'unused'"):
        got = score(model, mlp_batches(2), mlp_loss, targets=["0.weight", "unused"], progress=False)
    assert torch.equal(got["unused"], torch.zeros(3, 3))
    assert bool((got["0.weight"] != 0).any())


# ----------------------------------------------------------------------------------------------
# progress, dtypes
# ----------------------------------------------------------------------------------------------
def test_progress_false_prints_nothing(capsys):
    score(tiny_mlp(), mlp_batches(3), mlp_loss, targets=TARGET_NAMES, progress=False)
    out, err = capsys.readouterr()
    assert out == "" and err == "", f"progress=False printed: {out!r} {err!r}"


def test_progress_true_shows_bar(capsys):
    score(tiny_mlp(), mlp_batches(3), mlp_loss, targets=TARGET_NAMES, mode="abs", progress=True)
    out, err = capsys.readouterr()
    text = out + err
    assert "fastmask.score" in text and "3/3" in text, f"no progress bar: {text!r}"


def test_bf16_params_give_fp32_scores():
    model = tiny_mlp()
    model.to(torch.bfloat16)
    batches = mlp_batches(3)
    batches16 = [(x.bfloat16(), y.bfloat16()) for x, y in batches]
    got = score(model, batches16, mlp_loss, targets=TARGET_NAMES, mode="fisher", progress=False)
    params = dict(model.named_parameters())
    # hand computation on the bf16 model: grads in bf16, accumulated in fp64
    acc = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in TARGET_NAMES}
    for b in batches16:
        for n, g in zip(TARGET_NAMES, torch.autograd.grad(mlp_loss(model, b), [params[n] for n in TARGET_NAMES])):
            acc[n] += g.double() ** 2
    for n in TARGET_NAMES:
        assert got[n].dtype == torch.float32, f"{n}: score dtype {got[n].dtype}"
        assert got[n].shape == params[n].shape
        assert_close(got[n], acc[n].float(), rtol=1e-5, atol=1e-10, what=n)


# ----------------------------------------------------------------------------------------------
# the original SPU code's protocol: running sums, the l2-logits loss, the "until nonzero" rule
# ----------------------------------------------------------------------------------------------
def original_spu_scores(model, batches, names, loss_fn, n_score, threshold=1e-12):
    """The original code's ``compute_score`` transcribed: ``.grad`` cleared once before the loop and
    never between batches, ``importance += param.grad.clone()`` after every backward, and the loop
    left after batch ``num_batch`` (0-based) once ``num_batch > n_score`` and no importance entry is
    below ``threshold`` in magnitude. Selection then ranks ``importance.abs()``.

    Returns ``({name: |importance|}, batches used)``."""
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    importance = {n: torch.zeros_like(params[n]) for n in names}
    model.zero_grad()
    used = 0
    for num_batch, batch in enumerate(batches):
        stop_flag = 1
        loss_fn(model, batch).backward()
        for n in names:
            importance[n].data += params[n].grad.clone()
            if importance[n].data.abs().min() < threshold:
                stop_flag = 0
        used += 1
        if num_batch > n_score and stop_flag:
            break
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    return {n: v.abs() for n, v in importance.items()}, used


def _original_min_batches(n_score: float) -> int:
    """How many batches the original's loop condition ``num_batch > n_score`` scores at least."""
    return math.floor(n_score) + 2


@pytest.mark.parametrize("mode", ["grad", "abs", "fisher"])
def test_running_sum_equals_the_original_accumulation(mode):
    """accumulate="running-sum" adds G_b = g_1 + ... + g_b after each batch, bit for bit."""
    model = tiny_mlp()
    batches = mlp_batches(5)
    params = dict(model.named_parameters())
    model.zero_grad()
    want = {n: torch.zeros(params[n].shape) for n in TARGET_NAMES}
    for batch in batches:  # .grad never zeroed: it holds the running sum
        mlp_loss(model, batch).backward()
        for n in TARGET_NAMES:
            g = params[n].grad
            want[n] += {"grad": g, "abs": g.abs(), "fisher": g * g}[mode]
    if mode == "grad":
        want = {n: w.abs() for n, w in want.items()}
    model.zero_grad()
    got = score(model, batches, mlp_loss, targets=TARGET_NAMES, mode=mode, accumulate="running-sum", progress=False)
    for n in TARGET_NAMES:
        assert torch.equal(got[n], want[n]), f"{mode} running-sum score of {n} differs from the hand computation"
        assert params[n].grad is None


def test_running_sum_weighs_early_batches_more():
    """|sum_b G_b| = |sum_b (n - b + 1) g_b|, and it differs from the batch sum."""
    model = tiny_mlp()
    batches = mlp_batches(4)
    params = dict(model.named_parameters())
    acc = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in TARGET_NAMES}
    for b, batch in enumerate(batches):
        grads = torch.autograd.grad(mlp_loss(model, batch), [params[n] for n in TARGET_NAMES])
        for n, g in zip(TARGET_NAMES, grads):
            acc[n] += (len(batches) - b) * g.double()
    got = score(model, batches, mlp_loss, targets=TARGET_NAMES, accumulate="running-sum", progress=False)
    plain = score(model, batches, mlp_loss, targets=TARGET_NAMES, progress=False)
    for n in TARGET_NAMES:
        assert_close(got[n], acc[n].abs().float(), rtol=1e-5, atol=1e-7, what=n)
        assert not torch.allclose(got[n], plain[n]), n


def _late_input_batches(n: int, zero_until: int, b: int = 6):
    """Batches whose input feature 0 is exactly zero in the first ``zero_until`` batches, so the
    first layer's column 0 has an exactly zero gradient (and score) until then."""
    out = mlp_batches(n, b)
    for i in range(min(zero_until, n)):
        out[i][0][:, 0] = 0.0
    return out


@pytest.mark.parametrize("zero_until,n_score", [(0, 1.0), (5, 1.0), (6, 2.5), (3, 0.25)],
                         ids=["no-zeros", "zeros-until-5", "zeros-until-6", "zeros-until-3"])
def test_until_nonzero_equals_the_original_loop(zero_until, n_score):
    """The original's whole protocol (running sums + stop rule) on a tiny model, bit for bit."""
    batches = _late_input_batches(9, zero_until)
    model = tiny_mlp()
    want, used = original_spu_scores(model, batches, TARGET_NAMES, mlp_loss, n_score)
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        return mlp_loss(m, b)

    got = score(tiny_mlp(), batches, loss_fn, targets=TARGET_NAMES, accumulate="running-sum",
                max_batches=_original_min_batches(n_score), until_nonzero=1e-12, progress=False)
    assert len(calls) == used, f"scored {len(calls)} batches, the original {used}"
    assert used == max(_original_min_batches(n_score), zero_until + 1)
    for n in TARGET_NAMES:
        assert torch.equal(got[n], want[n]), n


def test_until_nonzero_stops_at_the_end_or_the_cap_with_a_warning():
    batches = _late_input_batches(6, zero_until=6)  # column 0 of the first layer never gets a gradient
    with pytest.warns(UserWarning, match=r"13 score entries are still below 1e-12.*6 batches.*batches ran out"):
        score(tiny_mlp(), batches, mlp_loss, targets=TARGET_NAMES, max_batches=2, until_nonzero=1e-12, progress=False)
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        return mlp_loss(m, b)

    with pytest.warns(UserWarning, match=r"after 4 batches \(2 beyond max_batches; max_extra_batches reached\)"):
        score(tiny_mlp(), iter(batches), loss_fn, targets=TARGET_NAMES, max_batches=2, until_nonzero=1e-12,
              max_extra_batches=2, progress=False)
    assert len(calls) == 4


def test_until_nonzero_argument_checks():
    kw = dict(targets=TARGET_NAMES, progress=False)
    with pytest.raises(ValueError, match="until_nonzero: needs max_batches"):
        score(tiny_mlp(), mlp_batches(2), mlp_loss, until_nonzero=1e-12, **kw)
    with pytest.raises(ValueError, match="max_extra_batches: needed"):
        score(tiny_mlp(), iter(mlp_batches(2)), mlp_loss, max_batches=1, until_nonzero=1e-12, **kw)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="until_nonzero: expected"):
            score(tiny_mlp(), mlp_batches(2), mlp_loss, max_batches=1, until_nonzero=bad, **kw)
    with pytest.raises(ValueError, match="max_extra_batches: expected"):
        score(tiny_mlp(), mlp_batches(2), mlp_loss, max_batches=1, max_extra_batches=-1, **kw)
    with pytest.raises(ValueError, match=r"accumulate: expected one of .*'running'"):
        score(tiny_mlp(), mlp_batches(2), mlp_loss, accumulate="running", **kw)


def test_l2_logits_loss_is_the_originals_on_open_clip():
    """The original: logits_per_image = logit_scale * img @ txt.T over one text per image,
    loss = torch.norm(logits_per_image, p="fro", dim=1).pow(2).mean(); no labels."""
    model = tiny_open_clip()
    images, texts = clip_batches(1)[0]
    img, txt, scale = model(images, texts)
    logits = scale * img @ txt.T
    want = torch.norm(logits, p="fro", dim=1).pow(2).mean()
    got = scoring.l2_logits_loss(model, (images, texts))
    assert torch.equal(got, want)
    assert torch.equal(scoring.l2_logits(logits), want)
    # the whole original protocol on open_clip: running sums of the l2-logits gradients
    names = list(find_targets(model).masked)
    batches = clip_batches(4)
    want_scores, used = original_spu_scores(model, batches, names, scoring.l2_logits_loss, n_score=1.0)
    got_scores = score(model, batches, scoring.l2_logits_loss, accumulate="running-sum", max_batches=3,
                       until_nonzero=1e-12, progress=False)
    assert used == 3
    for n in names:
        assert torch.equal(got_scores[n], want_scores[n]), n
