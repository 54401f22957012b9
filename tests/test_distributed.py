"""fastmask.distributed on 2 CPU ranks (gloo, spawned processes): score reduction, mask agreement,
the sparse DDP hook against plain DDP and against one process on the full batch.

The ranks are a pool of spawned worker processes that live for the module (``RankPool``, in
``tests/_dist.py``): each test sends a module-level function that every rank runs under one gloo
process group on 127.0.0.1. A rank that raises sends its traceback back, a rank that dies or does
not answer in time fails the test, and in both cases the pool is killed and re-created for the
next test.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastmask
from fastmask import MaskedAdamW, ops
from fastmask.distributed import (MaskedAllreduceState, MaskMismatchError, all_reduce_scores, mask_fingerprint,
                                  masked_allreduce_hook, verify_same_masks)

from ._dist import WORLD, RankPool, pool_holder, ranks  # noqa: F401 (fixtures)
from .utils import assert_close, random_indices

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

# ------------------------------------------------------------------------------------------------
# problems shared by the ranks and the single-process references
# ------------------------------------------------------------------------------------------------
MASKED = ("0.weight", "2.weight", "4.weight")


def mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(12, 48), nn.Tanh(), nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 5))


def batch(step: int, n: int = 16):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 12, generator=g), torch.randn(n, 5, generator=g)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def mse(model, xy):
    x, y = xy
    return ((model(x) - y) ** 2).mean()


def make_masks(model: nn.Module, densities=(0.2, 0.05, 0.1), seed: int = 3) -> dict[nn.Parameter, torch.Tensor]:
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    return {params[n]: random_indices(params[n].numel(), int(d * params[n].numel()), g)
            for n, d in zip(MASKED, densities)}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def signed_scores(model: nn.Module, batches, names, mode: str) -> dict[str, torch.Tensor]:
    """What fastmask.score accumulates before taking magnitudes: per-batch statistics summed by
    the score_accumulate_ op (for "grad" the signed sum)."""
    params = dict(model.named_parameters())
    scores = {n: torch.zeros(params[n].shape) for n in names}
    for b in batches:
        grads = torch.autograd.grad(mse(model, b), [params[n] for n in names])
        ops.score_accumulate_(list(scores.values()), list(grads), mode)
    return scores


# ------------------------------------------------------------------------------------------------
# local (no process group): the functions are no-ops or plain computations
# ------------------------------------------------------------------------------------------------
def test_without_process_group_nothing_happens():
    assert not dist.is_initialized()
    scores = {"a": torch.randn(3, 4)}
    before = scores["a"].clone()
    assert all_reduce_scores(scores, "grad") is scores
    assert torch.equal(scores["a"], before)
    verify_same_masks([("a", (3, 4), torch.tensor([1, 2], dtype=torch.int32))])
    with pytest.raises(ValueError, match="mode"):
        all_reduce_scores(scores, "magnitude")
    with pytest.raises(ValueError, match="contiguous"):
        all_reduce_scores({"a": torch.randn(4, 3).T}, "abs")
    model = mlp()
    opt = MaskedAdamW(model.parameters(), masks=make_masks(model), model=model)
    assert opt.mask_version == 1
    opt.set_masks({})
    assert opt.mask_version == 2


def test_mask_fingerprint():
    idx = torch.tensor([0, 5, 9], dtype=torch.int32)
    fp = mask_fingerprint(idx, (2, 5))
    assert fp == mask_fingerprint(idx.long(), torch.Size([2, 5]))  # dtype of the indices does not matter
    assert -(2**63) <= fp < 2**63
    others = [mask_fingerprint(idx, (5, 2)), mask_fingerprint(idx, (10,)), mask_fingerprint(idx[:2], (2, 5)),
              mask_fingerprint(torch.tensor([0, 5, 8]), (2, 5)), mask_fingerprint(None, (2, 5)),
              mask_fingerprint(idx[:0], (2, 5))]
    assert len({fp, *others}) == len(others) + 1


# ------------------------------------------------------------------------------------------------
# (1) score reduction
# ------------------------------------------------------------------------------------------------
SCORE_BATCHES = 6


def _scores_on_ranks(rank, world):
    model = mlp()
    batches = [batch(s, 8) for s in range(SCORE_BATCHES)][rank::world]  # a DistributedSampler-like shard
    out = {}
    for mode in ("grad", "abs", "fisher"):
        if mode == "grad":
            scores = signed_scores(model, batches, MASKED, mode)
        else:  # fastmask.score returns plain sums for these modes
            scores = fastmask.score(model, batches, mse, targets=list(MASKED), mode=mode, progress=False,
                                    all_reduce=False)
        all_reduce_scores(scores, mode)
        final = {n: s.abs() if mode == "grad" else s for n, s in scores.items()}
        masks = fastmask.select(final, density=0.1)
        out[mode] = (final, {n: masks[n].indices for n in MASKED})
    # A rank with other score tensors: every rank raises, naming the first difference.
    bad = {"0.weight": torch.zeros(3), ("x" if rank else "2.weight"): torch.zeros(4)}
    with pytest.raises(MaskMismatchError) as err:
        all_reduce_scores(bad, "abs")
    out["mismatch"] = str(err.value)
    return out


def test_score_reduction_matches_one_process(ranks):
    res = ranks.run(_scores_on_ranks)
    model = mlp()
    everything = [batch(s, 8) for s in range(SCORE_BATCHES)]
    for mode in ("grad", "abs", "fisher"):
        want = signed_scores(model, everything, MASKED, mode)
        want = {n: s.abs() if mode == "grad" else s for n, s in want.items()}
        want_masks = fastmask.select(want, density=0.1)
        (s0, m0), (s1, m1) = res[0][mode], res[1][mode]
        for n in MASKED:
            assert torch.equal(s0[n], s1[n]), f"{mode} {n}: ranks hold different reduced scores"
            assert torch.equal(m0[n], m1[n]), f"{mode} {n}: ranks selected different masks"
            assert_close(s0[n], want[n], rtol=1e-5, atol=1e-7, what=f"{mode} score of {n} vs one process")
            # masks equal one process's, except at ties within summation-order rounding
            got, exp = set(m0[n].tolist()), set(want_masks[n].indices.tolist())
            flat = want[n].reshape(-1)
            threshold = flat[want_masks[n].indices.long()].min()
            for i in got ^ exp:
                assert abs(flat[i] - threshold) <= 1e-5 * threshold, f"{mode} {n}: entry {i} is not a near-tie"
            assert len(got ^ exp) <= 2, f"{mode} {n}: {len(got ^ exp)} entries differ from one process's mask"
    for r in range(WORLD):
        msg = res[r]["mismatch"]
        assert "score tensor 1" in msg and "'2.weight'" in msg and "'x'" in msg and "rank 0" in msg, msg


def _score_api_on_ranks(rank, world):
    """fastmask.score itself under the process group: on a DDP-wrapped model, with uneven shards,
    with the original code's stop rule, and on a rank without batches."""
    model = mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    everything = [batch(s, 8) for s in range(SCORE_BATCHES)]
    out = {}
    for mode in ("grad", "abs", "fisher"):
        out[mode] = fastmask.score(ddp, everything[rank::world], mse, targets=list(MASKED), mode=mode,
                                   progress=False)
    # uneven shards and the original code's stop rule: rank 1 has fewer batches, no hang
    mine = everything[:4] if rank == 0 else everything[4:5]
    out["until"] = fastmask.score(model, mine, mse, targets=list(MASKED), max_batches=1, until_nonzero=1e3,
                                  progress=False)
    # a rank without a batch takes part with zeros
    out["empty"] = fastmask.score(model, everything[:3] if rank == 0 else [], mse, targets=list(MASKED),
                                  progress=False)
    try:
        fastmask.score(model, [], mse, targets=list(MASKED), progress=False)
        out["none"] = None
    except ValueError as exc:
        out["none"] = str(exc)
    out["local"] = fastmask.score(model, everything[rank::world], mse, targets=list(MASKED), progress=False,
                                  all_reduce=False)
    return out


def test_score_api_reduces_across_ranks(ranks):
    res = ranks.run(_score_api_on_ranks)
    model = mlp()
    everything = [batch(s, 8) for s in range(SCORE_BATCHES)]
    for mode in ("grad", "abs", "fisher"):
        want = fastmask.score(model, everything, mse, targets=list(MASKED), mode=mode, progress=False)
        for n in MASKED:
            assert torch.equal(res[0][mode][n], res[1][mode][n]), f"{mode} {n}: ranks differ"
            assert_close(res[0][mode][n], want[n], rtol=1e-5, atol=1e-7, what=f"{mode} {n} vs one process")
    # the stop rule with a threshold every entry stays below: extra batches go on only while every
    # rank has one; rank 1 has a single batch, so both stop after max_batches=1 (and nobody hangs)
    for n in MASKED:
        assert torch.equal(res[0]["until"][n], res[1]["until"][n])
    want = fastmask.score(model, everything[:1] + everything[4:5], mse, targets=list(MASKED), progress=False)
    for n in MASKED:
        assert_close(res[0]["until"][n], want[n], rtol=1e-5, atol=1e-7, what=f"until_nonzero {n}")
        want_empty = fastmask.score(model, everything[:3], mse, targets=list(MASKED), progress=False)[n]
        assert_close(res[1]["empty"][n], want_empty, rtol=1e-6, atol=1e-8, what=f"empty rank {n}")
    assert res[0]["none"] and "any rank" in res[0]["none"] and res[1]["none"] == res[0]["none"]
    assert not torch.equal(res[0]["local"]["0.weight"], res[1]["local"]["0.weight"])  # all_reduce=False


# ------------------------------------------------------------------------------------------------
# (2) training: sparse hook vs plain DDP vs one process on the full batch
# ------------------------------------------------------------------------------------------------
STEPS = 20
OPT_KW = dict(lr=1e-2, weight_decay=0.1)


def _ddp(model, hook_state, **kw):
    ddp = nn.parallel.DistributedDataParallel(model, **kw)
    if hook_state is not None:
        ddp.register_comm_hook(hook_state, masked_allreduce_hook)
    return ddp


def _train_variants(rank, world):
    out = {}
    for variant in ("plain", "hook", "hook-bucket-view"):
        model = mlp()
        opt = MaskedAdamW(model.parameters(), masks=make_masks(model), model=model, **OPT_KW)
        state = MaskedAllreduceState(opt) if variant != "plain" else None
        ddp = _ddp(model, state, bucket_cap_mb=0.004, gradient_as_bucket_view=variant == "hook-bucket-view")
        grads_ok = True
        for step in range(STEPS):
            x, y = batch(step)
            mse(ddp, (shard(x, rank, world), shard(y, rank, world))).backward()
            if state is not None:  # unselected entries of masked gradients are zeroed by the hook
                for p, idx in opt.masks.items():
                    keep = torch.zeros(p.numel(), dtype=torch.bool)
                    keep[idx.long()] = True
                    grads_ok &= bool((p.grad.reshape(-1)[~keep] == 0).all())
            opt.step()
            opt.zero_grad()
        info = {}
        if state is not None:
            plans = list(state._plans.values())
            info = dict(grads_ok=grads_ok, calls=state.calls, bytes=state.bytes_reduced,
                        mixed=any(p.dense_runs and p.masked_runs for p in plans),
                        compact=sum(p.numel_compact for p in plans), full=sum(p.numel for p in plans))
        out[variant] = (snapshot(model), info)
    return out


def test_hook_matches_plain_ddp_and_one_process(ranks):
    res = ranks.run(_train_variants)
    # one process, full batch
    model = mlp()
    init = snapshot(model)
    masks = make_masks(model)
    opt = MaskedAdamW(model.parameters(), masks=masks, model=model, **OPT_KW)
    for step in range(STEPS):
        mse(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
    single = snapshot(model)
    masked = {n: idx for n, p in model.named_parameters() for q, idx in masks.items() if q is p}

    plain = res[0]["plain"][0]
    for variant in ("plain", "hook", "hook-bucket-view"):
        for r in range(WORLD):
            params, info = res[r][variant]
            for n, p in params.items():
                assert torch.equal(p, res[0][variant][0][n]), f"{variant} {n}: rank {r} differs from rank 0"
                assert torch.equal(p, plain[n]), f"{variant} {n}: differs from plain DDP"
                assert_close(p, single[n], rtol=1e-4, atol=1e-5, what=f"{variant} {n} vs one process")
                if n in masked:
                    keep = torch.zeros(p.numel(), dtype=torch.bool)
                    keep[masked[n].long()] = True
                    assert torch.equal(p.reshape(-1)[~keep], init[n].reshape(-1)[~keep]), f"{n}: unselected moved"
                    assert not torch.equal(p.reshape(-1)[keep], init[n].reshape(-1)[keep]), f"{n}: nothing learnt"
                else:
                    assert not torch.equal(p, init[n]), f"{n}: nothing learnt"
            if variant != "plain":
                assert info["grads_ok"], f"{variant}: unselected gradient entries not zeroed"
                assert info["mixed"], "no bucket mixed masked and dense parameters"
                full_bytes = sum(p.numel() for p in init.values()) * 4
                k = sum(i.numel() for i in masked.values())
                dense = sum(init[n].numel() for n in init if n not in masked)
                assert info["compact"] == k + dense and info["full"] == sum(p.numel() for p in init.values())
                assert info["bytes"] < STEPS * full_bytes


# ------------------------------------------------------------------------------------------------
# (3) masks agree or fail loudly
# ------------------------------------------------------------------------------------------------
def _mismatch(rank, world):
    out = {}
    model = mlp()
    masks = make_masks(model)
    p2 = dict(model.named_parameters())["2.weight"]
    other = dict(masks)
    if rank == 1:
        other[p2] = masks[p2][1:]  # one selected entry fewer on rank 1
    # construction
    try:
        MaskedAdamW(model.parameters(), masks=other, model=model)
        out["init"] = None
    except MaskMismatchError as exc:
        out["init"] = str(exc)
    # set_masks: refused on every rank, nothing changes
    opt = MaskedAdamW(model.parameters(), masks=masks, model=model)
    before, version = {p: i.clone() for p, i in opt.masks.items()}, opt.mask_version
    try:
        opt.set_masks(other)
        out["set"] = None
    except MaskMismatchError as exc:
        out["set"] = str(exc)
    out["set_atomic"] = (opt.mask_version == version and opt.masks.keys() == before.keys()
                         and all(torch.equal(opt.masks[p], before[p]) for p in before))
    # a rank that fails its own checks: it raises its error, the others a RuntimeError naming it
    bad = dict(masks)
    if rank == 1:
        bad[p2] = torch.tensor([0, 10**6], dtype=torch.int32)
    try:
        opt.set_masks(bad)
        out["local"] = None
    except (IndexError, RuntimeError) as exc:
        out["local"] = f"{type(exc).__name__}: {exc}"
    # load_state_dict adopting masks: each rank's checkpoint made with its own masks
    src = MaskedAdamW(model.parameters(), masks=other, model=model, verify_masks=False)
    model(torch.randn(2, 12)).sum().backward()
    src.step()
    dst = MaskedAdamW(model.parameters(), model=model)
    try:
        dst.load_state_dict(src.state_dict())
        out["load"] = None
    except MaskMismatchError as exc:
        out["load"] = str(exc)
    out["load_atomic"] = not dst.masks
    same = MaskedAdamW(model.parameters(), masks=masks, model=model)
    same.step()
    dst.load_state_dict(same.state_dict())  # equal masks: adopted on every rank
    out["adopted"] = len(dst.masks)
    # a rank whose checkpoint is refused by its own checks, while the other adopts masks
    fresh = MaskedAdamW(model.parameters(), model=model)
    sd = same.state_dict()
    if rank == 1:
        sd = dict(sd, param_groups=sd["param_groups"] * 2)
    try:
        fresh.load_state_dict(sd)
        out["load_local"] = None
    except (ValueError, RuntimeError) as exc:
        out["load_local"] = f"{type(exc).__name__}: {exc}"
    out["load_local_atomic"] = not fresh.masks
    # verify_masks=False: no check (and no collective)
    MaskedAdamW(model.parameters(), masks=other, model=model, verify_masks=False)
    return out


def test_mask_mismatch_fails_loudly(ranks):
    res = ranks.run(_mismatch)
    for r in range(WORLD):
        out = res[r]
        for key in ("init", "set", "load"):
            msg = out[key]
            assert msg is not None, f"rank {r}: {key} accepted different masks"
            assert "'2.weight'" in msg and "rank 0: 96 selected of 1920" in msg and "rank 1: 95 selected" in msg, msg
        assert out["set_atomic"], f"rank {r}: a refused set_masks changed the masks"
        assert out["load_atomic"], f"rank {r}: a refused load_state_dict adopted masks"
        assert out["adopted"] == 3
    assert res[1]["local"].startswith("IndexError") and "out of range" in res[1]["local"], res[1]["local"]
    assert res[0]["local"].startswith("RuntimeError") and "failed on rank(s) [1]" in res[0]["local"], res[0]["local"]
    assert res[1]["load_local"].startswith("ValueError") and "parameter groups" in res[1]["load_local"]
    assert res[0]["load_local"].startswith("RuntimeError") and "load_state_dict: failed on rank(s) [1]" in \
        res[0]["load_local"], res[0]["load_local"]
    assert res[0]["load_local_atomic"] and res[1]["load_local_atomic"]


# ------------------------------------------------------------------------------------------------
# (4) empty masks, buckets of every kind, set_masks between steps with the hook
# ------------------------------------------------------------------------------------------------
def _hook_edge_cases(rank, world):
    out = {}
    for cap in (1e-4, 0.004, 25):  # one param per bucket; mixed buckets; one bucket
        for variant in ("plain", "hook"):
            model = mlp()
            params = dict(model.named_parameters())
            masks = make_masks(model, densities=(0.2, 0.05, 0.0))  # 4.weight: an empty mask
            opt = MaskedAdamW(model.parameters(), masks=masks, model=model, **OPT_KW)
            state = MaskedAllreduceState(opt) if variant == "hook" else None
            ddp = _ddp(model, state, bucket_cap_mb=cap)
            versions = []
            for step in range(8):
                if step == 4:  # the next task's masks: 0.weight keeps none, 2.weight changes, 4.bias masked
                    g = torch.Generator().manual_seed(7)
                    opt.set_masks({params["0.weight"]: torch.empty(0, dtype=torch.int32),
                                   params["2.weight"]: random_indices(1920, 300, g),
                                   params["4.bias"]: torch.tensor([1, 3], dtype=torch.int32)})
                x, y = batch(step)
                mse(ddp, (shard(x, rank, world), shard(y, rank, world))).backward()
                if state is not None:
                    versions.append(next(iter(state._plans.values())).version)
                    g4 = params["4.weight"].grad if step < 4 else params["0.weight"].grad
                    assert bool((g4 == 0).all()), "a parameter with an empty mask kept a gradient"
                opt.step()
                opt.zero_grad()
            out[(cap, variant)] = (snapshot(model), versions, state.calls if state else None)
    return out


def test_hook_empty_masks_buckets_and_set_masks(ranks):
    res = ranks.run(_hook_edge_cases)
    init = snapshot(mlp())
    for cap in (1e-4, 0.004, 25):
        plain = res[0][(cap, "plain")][0]
        for r in range(WORLD):
            params, versions, calls = res[r][(cap, "hook")]
            assert versions[:4] == [1] * 4 and versions[4:] == [2] * 4, versions  # plans follow set_masks
            for n, p in params.items():
                assert torch.equal(p, plain[n]), f"cap {cap}, {n}: hook differs from plain DDP on rank {r}"
    # with one param per bucket, the empty-mask bucket sends nothing: fewer calls than buckets x steps
    _, _, calls = res[0][(1e-4, "hook")]
    assert calls < 8 * len(init)


# ------------------------------------------------------------------------------------------------
# a tiny open_clip CLIP: distributed scoring, masks, hook vs plain DDP
# ------------------------------------------------------------------------------------------------
def _clip(rank, world):
    from .utils import clip_batches, clip_loss, tiny_open_clip

    out = {}
    for variant in ("plain", "hook"):
        model = tiny_open_clip(0)
        targets = fastmask.find_targets(model)
        fastmask.freeze(model, targets)
        data = clip_batches(4, batch=4, seed=rank)  # this rank's shard
        params = dict(targets.masked)
        scores = {n: torch.zeros(p.shape) for n, p in params.items()}
        for b in data[:2]:
            grads = torch.autograd.grad(clip_loss(model, b), list(params.values()))
            ops.score_accumulate_(list(scores.values()), list(grads), "grad")
        all_reduce_scores(scores, "grad")
        masks = fastmask.select({n: s.abs() for n, s in scores.items()}, density=0.1)
        opt = MaskedAdamW(targets.parameters(), lr=1e-3, masks=masks, model=model)
        state = MaskedAllreduceState(opt) if variant == "hook" else None
        ddp = _ddp(model, state)
        for b in data:
            clip_loss(ddp, b).backward()
            opt.step()
            opt.zero_grad()
        out[variant] = ({n: m.indices for n, m in masks.items()}, snapshot(model))
    return out


def test_tiny_clip_hook_matches_plain_ddp(ranks):
    res = ranks.run(_clip)
    for r in range(WORLD):
        for variant in ("plain", "hook"):
            masks, params = res[r][variant]
            for n, m in masks.items():
                assert torch.equal(m, res[0]["plain"][0][n]), f"{n}: rank {r} selected another mask"
            for n, p in params.items():
                assert torch.equal(p, res[0]["plain"][1][n]), f"{variant} {n}: rank {r} differs from plain DDP rank 0"


# ------------------------------------------------------------------------------------------------
# the pool itself: a rank's error comes back with its traceback, a silent rank is killed in time
# ------------------------------------------------------------------------------------------------
def _ranks(rank, world):
    return rank


def _fail_on_rank_1(rank, world):
    if rank == 1:
        raise KeyError("rank one's own error")
    return rank


def _sleep_on_rank_0(rank, world):
    if rank == 0:
        time.sleep(60)
    return rank


def test_rank_pool_reports_errors_and_timeouts():
    pool = RankPool(WORLD)
    try:
        assert pool.run(_ranks) == [0, 1]
        with pytest.raises(AssertionError, match=r"(?s)failed on rank\(s\) \[1\].*KeyError: \"rank one's own error\""):
            pool.run(_fail_on_rank_1)
        assert pool.broken and not any(p.is_alive() for p in pool.procs)
    finally:
        pool.close(kill=True)
    pool = RankPool(WORLD)
    try:
        t0 = time.monotonic()
        with pytest.raises(AssertionError, match=r"rank 0 did not answer within 3 s"):
            pool.run(_sleep_on_rank_0, timeout=3)
        assert time.monotonic() - t0 < 20 and not any(p.is_alive() for p in pool.procs)
    finally:
        pool.close(kill=True)
