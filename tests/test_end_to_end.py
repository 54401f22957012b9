"""End to end on a tiny open_clip CLIP: targets -> freeze -> score -> select -> MaskedAdamW training."""
from __future__ import annotations

import pytest
import torch

import fastmask
from fastmask import MaskSet, MaskedAdamW, find_targets, freeze

from .utils import assert_close, clip_batches, clip_loss, tiny_open_clip

STEPS = 20


def prepare(tmp_path=None, reload: bool = False):
    model = tiny_open_clip()
    targets = find_targets(model)
    freeze(model, targets)
    scores = fastmask.score(model, clip_batches(3, seed=1), clip_loss, targets=targets, progress=False)
    maskset = fastmask.select(scores, 0.1)
    if reload:
        path = tmp_path / "task0.safetensors"
        maskset.save(path, metadata={"task": "tiny"})
        loaded = MaskSet.load(path)
        assert loaded == maskset, "MaskSet changed on its way through the file"
        maskset = loaded
    return model, targets, scores, maskset


def train(model, targets, maskset, steps=STEPS):
    opt = MaskedAdamW(targets.parameters(), lr=1e-2, weight_decay=0.1, masks=maskset, model=model)
    batches = clip_batches(steps, seed=2)
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss = clip_loss(model, b)
        assert torch.isfinite(loss), "training loss is not finite"
        loss.backward()
        opt.step()
    return opt


@pytest.mark.parametrize("reload", [False, True], ids=["in_memory", "saved_and_loaded"])
def test_spu_training_changes_exactly_selected_entries(reload, tmp_path):
    model, targets, scores, maskset = prepare(tmp_path, reload)
    assert list(maskset) == list(targets.masked), "one mask per masked target, in order"
    for n, p in targets.masked.items():
        assert maskset[n].k == int(0.1 * p.numel()) == p.numel() // 10, f"{n}: k={maskset[n].k}"
        assert maskset[n].shape == p.shape
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, targets, maskset)

    for n, p in model.named_parameters():
        old, new = before[n], p.detach()
        if n in targets.masked:
            sel = maskset[n].to_bool()
            changed = new != old
            n_sel_unchanged = int((sel & ~changed).sum())
            assert n_sel_unchanged == 0, f"{n}: {n_sel_unchanged} of {maskset[n].k} selected entries did not change"
            n_unsel_changed = int((~sel & changed).sum())
            assert n_unsel_changed == 0, f"{n}: {n_unsel_changed} unselected entries changed (must be bit-exact)"
            assert torch.equal(new[~sel], old[~sel])
        elif n in targets.dense:
            frac = float((new != old).float().mean())
            assert frac == 1.0, f"dense target {n}: only {frac:.1%} of its entries changed"
        else:
            assert torch.equal(new, old), f"frozen parameter {n} changed"
            assert p.grad is None, f"frozen parameter {n} got a gradient"


def test_selected_entries_follow_plain_adamw(tmp_path):
    """The selected entries and the dense extras follow torch.optim.AdamW exactly (up to fp32 rounding)
    when AdamW's model keeps its unselected entries pinned back to their old values after each step."""
    model, targets, _, maskset = prepare(tmp_path)
    ref_model = tiny_open_clip()
    ref_model.load_state_dict(model.state_dict())
    ref_targets = find_targets(ref_model)
    freeze(ref_model, ref_targets)
    keep = {n: (~maskset[n].to_bool(), p.detach().clone()) for n, p in ref_targets.masked.items()}
    ref_opt = torch.optim.AdamW(ref_targets.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)

    opt = MaskedAdamW(targets.parameters(), lr=1e-2, weight_decay=0.1, masks=maskset, model=model)
    for b in clip_batches(6, seed=3):
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad(set_to_none=True)
            clip_loss(m, b).backward()
            o.step()
        with torch.no_grad():
            for n, (unsel, old) in keep.items():
                p = ref_targets.masked[n]
                p[unsel] = old[unsel]
    ref = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        assert_close(p.detach(), ref[n].detach(), rtol=2e-5, atol=2e-6, what=n)


def test_masks_for_model_match_optimizer_masks(tmp_path):
    model, targets, _, maskset = prepare(tmp_path)
    opt = MaskedAdamW(targets.parameters(), lr=1e-2, weight_decay=0.1, masks=maskset, model=model)
    got = opt.masks
    assert set(got) == set(targets.masked.values())
    for n, p in targets.masked.items():
        assert torch.equal(got[p].cpu(), maskset[n].indices), n
