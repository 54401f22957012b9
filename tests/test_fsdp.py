"""MaskedAdamW on FSDP2 (``fully_shard``) DTensor parameters, 2 CPU ranks (gloo, spawned processes).

An MLP whose layers have dim-0 sizes that do not split evenly over 2 ranks (37, 29, 3, 1 rows:
rank 1 holds no row at all of the last weight), one block per ``fully_shard`` plus the root, and
masks of every kind: random, all inside rank 0's rows (rank 1 holds no selected entry), empty,
and on the weight rank 1 holds nothing of. Checked against one process on the full batch: 20
steps (params within rounding, unselected entries bit-exact, compact state only for the local
selected entries, tracked scores), state dicts through ``torch.distributed.checkpoint`` (sharded
``dcp.save``/``dcp.load``, flattened, ``full_state_dict=True``) and plain
``state_dict()``/``load_state_dict()`` (masks adopted too), each resumed bit-identically to an
uninterrupted run, and read by one process; dense parameters against ``torch.optim.AdamW`` with
the same ``foreach``/``fused`` flags; refusals; a replicated DTensor; a tiny open_clip CLIP.
The rank pool is ``tests/_dist.py``'s.
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastmask
from fastmask import MaskedAdamW, MaskSet
from fastmask.distributed import MaskMismatchError, is_dtensor

from ._dist import WORLD, pool_holder, ranks  # noqa: F401 (fixtures)
from .utils import assert_close, random_indices

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

STEPS = 20
OPT_KW = dict(lr=1e-2, weight_decay=0.1)
MASKED_KW = dict(OPT_KW, track_scores="grad")  # scores: state placed like the parameter
MASKED = ("0.weight", "2.weight", "4.weight", "6.weight")


# ------------------------------------------------------------------------------------------------
# the problem, on the ranks and in one process
# ------------------------------------------------------------------------------------------------
def mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(12, 37), nn.Tanh(), nn.Linear(37, 29), nn.Tanh(), nn.Linear(29, 3), nn.Tanh(),
                         nn.Linear(3, 1))


def mask_indices() -> dict[str, torch.Tensor]:
    """0.weight: random; 2.weight: only in rank 0's rows (0-14 of 29); 4.weight: empty; 6.weight
    ([1, 3], rank 1 holds none of its rows): two entries."""
    g = torch.Generator().manual_seed(3)
    return {"0.weight": random_indices(37 * 12, 89, g), "2.weight": random_indices(15 * 37, 50, g),
            "4.weight": torch.empty(0, dtype=torch.int32), "6.weight": torch.tensor([0, 2], dtype=torch.int32)}


def mask_set() -> MaskSet:
    shapes = {n: tuple(p.shape) for n, p in mlp().named_parameters()}
    return MaskSet.from_indices(mask_indices(), {n: shapes[n] for n in MASKED})


def batch(step: int, n: int = 16):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 12, generator=g), torch.randn(n, 1, generator=g)


def half(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n: (rank + 1) * n]


def mse(model, x, y):
    return ((model(x) - y) ** 2).mean()


def train(model, opt, steps, rank=0, world=1, start=0) -> None:
    for s in range(start, start + steps):
        x, y = batch(s)
        mse(model, half(x, rank, world), half(y, rank, world)).backward()
        opt.step()
        opt.zero_grad()


def sharded_mlp(mesh, **kw) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    for i in (0, 2, 4, 6):
        fully_shard(model[i], mesh=mesh, **kw)
    fully_shard(model, mesh=mesh)
    return model


def mesh_of(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if is_dtensor(p) else p).detach().clone() for n, p in model.named_parameters()}


def single_run(steps: int = STEPS, **kw):
    """One process on the full batch; returns the model and the optimizer."""
    model = mlp()
    opt = MaskedAdamW(model.parameters(), masks=mask_set(), model=model, **MASKED_KW, **kw)
    train(model, opt, steps)
    return model, opt


def to_plain(tree):
    """A state dict with DTensors gathered and everything cloned (safe to send and compare)."""
    if isinstance(tree, dict):
        return {k: to_plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_plain(v) for v in tree)
    if is_dtensor(tree):
        return tree.full_tensor().clone()
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    return tree


# ------------------------------------------------------------------------------------------------
# (1) training: FSDP2 vs one process
# ------------------------------------------------------------------------------------------------
def _train(rank, world):
    mesh = mesh_of(world)
    model = sharded_mlp(mesh)
    opt = MaskedAdamW(model.parameters(), masks=mask_set(), model=model, **MASKED_KW)
    params = dict(model.named_parameters())
    local = {n: opt.state[params[n]]["exp_avg"].numel() for n in MASKED}
    masks = {n: opt.masks[params[n]].clone() for n in MASKED}
    rows = {n: (p.to_local().shape[0], type(p).__name__) for n, p in params.items()}
    train(model, opt, STEPS, rank, world)
    scores = {n: (type(s).__name__, s.full_tensor()) for n, s in opt.scores().items()}
    return dict(params=full_params(model), local=local, masks=masks, rows=rows, scores=scores)


def test_fsdp_matches_one_process(ranks):
    res = ranks.run(_train)
    init = {n: p.detach().clone() for n, p in mlp().named_parameters()}
    model, single_opt = single_run()
    single = {n: p.detach() for n, p in model.named_parameters()}
    want = mask_indices()
    for r in range(2):  # tracked scores: DTensors placed like the parameters
        for n, s in single_opt.scores().items():
            kind, got = res[r]["scores"][n]
            assert kind == "DTensor"
            assert_close(got, s, rtol=1e-4, atol=1e-6, what=f"tracked scores of {n}")
    assert res[0]["rows"]["0.weight"] == (19, "DTensor") and res[1]["rows"]["0.weight"] == (18, "DTensor")
    assert res[1]["rows"]["6.weight"][0] == 0, "rank 1 should hold no row of 6.weight"
    for n in MASKED:
        # the user sees global masks; each rank keeps state for the selected entries of its rows
        for r in range(2):
            assert torch.equal(res[r]["masks"][n], want[n]), f"{n}: opt.masks is not the global mask on rank {r}"
        row_numel = init[n][0].numel()
        split = 19 if n == "0.weight" else {"2.weight": 15, "4.weight": 2, "6.weight": 1}[n]
        in_rank0 = int((want[n] < split * row_numel).sum())
        assert (res[0]["local"][n], res[1]["local"][n]) == (in_rank0, want[n].numel() - in_rank0), n
    assert res[1]["local"]["2.weight"] == 0 and res[0]["local"]["4.weight"] == 0
    for r in range(2):
        for n, p in res[r]["params"].items():
            assert torch.equal(p, res[0]["params"][n]), f"{n}: rank {r} differs from rank 0"
            assert_close(p, single[n], rtol=1e-4, atol=1e-5, what=f"{n}: FSDP vs one process")
            if n in MASKED:
                keep = torch.zeros(p.numel(), dtype=torch.bool)
                keep[want[n].long()] = True
                assert torch.equal(p.reshape(-1)[~keep], init[n].reshape(-1)[~keep]), f"{n}: unselected moved"
                if want[n].numel():
                    assert not torch.equal(p.reshape(-1)[keep], init[n].reshape(-1)[keep]), f"{n}: nothing learnt"
            else:
                assert not torch.equal(p, init[n]), f"{n}: nothing learnt"


# ------------------------------------------------------------------------------------------------
# (2) state dicts: DCP (sharded and full), plain state_dict(), a single-process checkpoint;
#     every resume equals the uninterrupted run
# ------------------------------------------------------------------------------------------------
HALF = STEPS // 2


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _resume(rank, world, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    full_opts = StateDictOptions(full_state_dict=True)
    mesh = mesh_of(world)
    model = sharded_mlp(mesh)
    opt = MaskedAdamW(model.parameters(), masks=mask_set(), model=model, **MASKED_KW)
    train(model, opt, HALF, rank, world)
    # checkpoints at step HALF
    flat_opts = StateDictOptions(flatten_optimizer_state_dict=True)  # as torchtitan saves optimizers
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    dcp.save({"optim": get_optimizer_state_dict(model, opt, options=flat_opts)}, checkpoint_id=path + "-flat")
    sharded = get_optimizer_state_dict(model, opt)
    form = {}
    for n in MASKED:
        st = sharded["state"][n]
        e = st["exp_avg"]
        form[n] = (type(e).__name__, tuple(e.shape), tuple(e.placements), e.to_local().numel(),
                   type(st["mask_indices"]).__name__, st["mask_indices"].clone())
    full = to_plain(get_optimizer_state_dict(model, opt, options=full_opts))
    full_model = to_plain(get_model_state_dict(model, options=full_opts))
    plain = _save_load(opt.state_dict())  # each rank its own file, as torch.save(opt.state_dict()) per rank
    local_params = [p.to_local().detach().clone() for p in model.parameters()]
    train(model, opt, HALF, rank, world, start=HALF)
    out = dict(uninterrupted=full_params(model), form=form, full=full, full_model=full_model)

    def fresh(masked=True):
        m = sharded_mlp(mesh)
        return m, MaskedAdamW(m.parameters(), masks=mask_set() if masked else None, model=m, **MASKED_KW)

    def copy_params(m):
        with torch.no_grad():
            for p, v in zip(m.parameters(), local_params):
                p.to_local().copy_(v)

    resumed = {}
    # sharded DCP: templates from the fresh model and optimizer, filled by dcp.load
    m, o = fresh()
    template = {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, o)}
    dcp.load(template, checkpoint_id=path)
    set_model_state_dict(m, template["model"])
    set_optimizer_state_dict(m, o, template["optim"])
    resumed["dcp"] = (m, o)
    # the same with flattened optimizer state dicts
    m, o = fresh()
    copy_params(m)
    template = {"optim": get_optimizer_state_dict(m, o, options=flat_opts)}
    dcp.load(template, checkpoint_id=path + "-flat")
    set_optimizer_state_dict(m, o, template["optim"], options=flat_opts)
    resumed["dcp-flat"] = (m, o)
    # full state dicts through the DCP helpers
    m, o = fresh()
    # (copies: with full_state_dict=True the helpers turn the given dict's tensors into DTensors)
    set_model_state_dict(m, to_plain(full_model), options=full_opts)
    set_optimizer_state_dict(m, o, to_plain(full), options=full_opts)
    resumed["dcp-full"] = (m, o)
    # plain state_dict() / load_state_dict()
    m, o = fresh()
    copy_params(m)
    o.load_state_dict(plain)
    resumed["plain"] = (m, o)
    # the full (whole-tensor) state dict through plain load_state_dict: each rank keeps its part
    m, o = fresh()
    copy_params(m)
    assert not any(is_dtensor(v) for st in full["state"].values() for v in st.values())
    o.load_state_dict(full)
    resumed["plain-full"] = (m, o)
    # an optimizer without masks adopts them from the sharded state dict
    m, o = fresh(masked=False)
    copy_params(m)
    o.load_state_dict(plain)
    adopted = {n: o.masks[p].clone() for n, p in m.named_parameters() if p in o.masks}
    resumed["adopt"] = (m, o)
    for key, (m, o) in resumed.items():
        train(m, o, HALF, rank, world, start=HALF)
        out[key] = (full_params(m), {n: s.full_tensor() for n, s in o.scores().items()})
    out["uninterrupted"] = (out["uninterrupted"], {n: s.full_tensor() for n, s in opt.scores().items()})
    out["adopted"] = adopted
    # a single-process checkpoint (whole tensors) loaded into the sharded optimizer
    single, single_opt = single_run(HALF)
    m, o = fresh()
    set_model_state_dict(m, {n: p.detach() for n, p in single.named_parameters()}, options=full_opts)
    o.load_state_dict(single_opt.state_dict())
    train(m, o, HALF, rank, world, start=HALF)
    out["from-single"] = full_params(m)
    return out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process reads a checkpoint
def test_fsdp_state_dicts_resume_identically(ranks, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = str(tmp_path / "ckpt")
    res = ranks.run(_resume, path)
    want = mask_indices()
    # the sharded state dict: whole compact arrays as DTensors in DTensor's layout, global masks
    for r in range(2):
        for n in MASKED:
            kind, shape, placements, local, mkind, midx = res[r]["form"][n]
            k = want[n].numel()
            assert (kind, shape, mkind) == ("DTensor", (k,), "Tensor"), (n, res[r]["form"][n])
            assert [repr(pl) for pl in placements] == ["Shard(dim=0)"], placements
            assert local == min(max(k - r * ((k + 1) // 2), 0), (k + 1) // 2), (n, r, local)
            assert torch.equal(midx, want[n])
    # the full state dict is the single-process one (within rounding of the reductions)
    _, single_opt = single_run(HALF)
    one = single_opt.state_dict()
    names = dict(zip(one["param_groups"][0]["params"], [n for n, _ in mlp().named_parameters()]))
    for r in range(2):
        full = res[r]["full"]["state"]
        for sid, st in one["state"].items():
            got = full[names[sid]]
            assert got.keys() == st.keys(), (names[sid], got.keys(), st.keys())
            for key, v in st.items():
                if key in ("mask_indices", "param_shape", "step"):
                    assert torch.equal(got[key], v), (names[sid], key)
                else:
                    assert_close(got[key], v, rtol=1e-4, atol=1e-6, what=f"full state {names[sid]} {key}")
    for r in range(2):
        base, base_scores = res[r]["uninterrupted"]
        for key in ("dcp", "dcp-flat", "dcp-full", "plain", "plain-full", "adopt"):
            params, scores = res[r][key]
            for n, p in params.items():
                assert torch.equal(p, base[n]), f"resume via {key}: {n} differs from the uninterrupted run (rank {r})"
            for n, sc in scores.items():
                assert torch.equal(sc, base_scores[n]), f"resume via {key}: scores of {n} differ (rank {r})"
        assert sorted(res[r]["adopted"]) == sorted(MASKED)
        for n in MASKED:
            assert torch.equal(res[r]["adopted"][n], want[n])
        model, _ = single_run()
        for n, p in model.named_parameters():
            assert_close(res[r]["from-single"][n], p.detach(), rtol=1e-4, atol=1e-5,
                         what=f"resume from a single-process checkpoint: {n}")
    # the 2-rank checkpoints hold the single-process layout: one process resumes from them
    reference, _ = single_run()
    for source in ("full", "dcp"):
        model = mlp()
        model.load_state_dict(res[0]["full_model"])
        opt = MaskedAdamW(model.parameters(), masks=mask_set(), model=model, **MASKED_KW)
        if source == "full":
            sd = res[0]["full"]
        else:  # the sharded DCP checkpoint, read whole by one process (no process group)
            sd = get_optimizer_state_dict(model, opt)
            dcp.load({"optim": sd}, checkpoint_id=path, no_dist=True)
        set_optimizer_state_dict(model, opt, sd)  # maps the names back to parameters
        train(model, opt, HALF, start=HALF)
        for n, p in model.named_parameters():
            assert_close(p.detach(), dict(reference.named_parameters())[n].detach(), rtol=1e-4, atol=1e-5,
                         what=f"one process resumed from the 2-rank {source} checkpoint: {n}")


# ------------------------------------------------------------------------------------------------
# (3) dense DTensor parameters: torch's own AdamW functional, with the group's flags
# ------------------------------------------------------------------------------------------------
FLAGS = (dict(), dict(foreach=True), dict(fused=True))


def _dense_flags(rank, world):
    mesh = mesh_of(world)
    out = []
    for flags in FLAGS:
        runs = []
        for make in (lambda m: MaskedAdamW(m.parameters(), **OPT_KW, **flags),
                     lambda m: torch.optim.AdamW(m.parameters(), **OPT_KW, **flags)):
            model = sharded_mlp(mesh)
            train(model, make(model), 5, rank, world)
            runs.append(full_params(model))
        # and with masks: the masked step beside dense params with these flags, vs one process
        model = sharded_mlp(mesh)
        train(model, MaskedAdamW(model.parameters(), masks=mask_set(), model=model, **OPT_KW, **flags), 5, rank, world)
        out.append((*runs, full_params(model)))
    return out


def test_fsdp_dense_params_match_torch_adamw(ranks):
    res = ranks.run(_dense_flags)
    for flags, (mine, torch_adamw, masked) in zip(FLAGS, res[0]):
        for n, p in mine.items():
            assert torch.equal(p, torch_adamw[n]), f"{flags}: {n} differs from torch.optim.AdamW on FSDP"
        model, _ = single_run(5, **flags)
        for n, p in model.named_parameters():
            assert_close(masked[n], p.detach(), rtol=1e-4, atol=1e-5, what=f"{flags}: masked {n} vs one process")


# ------------------------------------------------------------------------------------------------
# (4) what is refused, and how
# ------------------------------------------------------------------------------------------------
def _refusals(rank, world):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.tensor import Shard

    out = {}
    mesh = mesh_of(world)
    # a weight sharded on dim 1 (0.weight, [37, 12]): refused when masked (naming it), stepped by
    # torch's AdamW when dense (FSDP2 refuses uneven Shard(1) itself: only even widths)
    model = sharded_mlp(mesh, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 and p.shape[1] % 2 == 0 else None)
    try:
        MaskedAdamW(model.parameters(), masks=mask_set(), model=model)
        out["shard1"] = None
    except NotImplementedError as exc:
        out["shard1"] = str(exc)
    opt = MaskedAdamW(model.parameters(), masks={}, **OPT_KW)
    train(model, opt, 2, rank, world)
    out["shard1-dense"] = full_params(model)

    model = sharded_mlp(mesh)
    params = dict(model.named_parameters())
    opt = MaskedAdamW(model.parameters(), masks=mask_set(), model=model, **OPT_KW)
    train(model, opt, 2, rank, world)
    # a plain gradient for a DTensor parameter: refused before anything is written
    before = full_params(model)
    mse(model, *batch(0)).backward()
    params["0.weight"].grad = torch.zeros(params["0.weight"].shape)
    try:
        opt.step()
        out["plain-grad"] = None
    except ValueError as exc:
        out["plain-grad"] = str(exc)
    opt.zero_grad()
    out["plain-grad-atomic"] = all(torch.equal(p, before[n]) for n, p in full_params(model).items())
    sd = get_optimizer_state_dict(model, opt)
    # a state dict made for other masks: refused on every rank, nothing changes
    other = MaskSet.from_indices({**mask_indices(), "0.weight": torch.tensor([1, 2, 3], dtype=torch.int32)},
                                 {n: tuple(params[n].shape) for n in MASKED})
    dst = MaskedAdamW(model.parameters(), masks=other, model=model)
    try:
        dst.load_state_dict(sd)
        out["other-masks"] = None
    except ValueError as exc:
        out["other-masks"] = f"{type(exc).__name__}: {exc}"
    out["other-masks-atomic"] = float(dst.state[params["0.weight"]]["step"])
    # rank 1 refuses its state dict: it raises its own error, rank 0 names it (no hang)
    bad = dict(sd, param_groups=sd["param_groups"] * 2) if rank == 1 else sd
    try:
        MaskedAdamW(model.parameters(), masks=mask_set(), model=model).load_state_dict(bad)
        out["one-rank"] = None
    except (ValueError, RuntimeError) as exc:
        out["one-rank"] = f"{type(exc).__name__}: {exc}"
    # rank 1 loads the whole state dict, rank 0 its part of the sharded one: refused on both
    whole = to_plain(sd)  # collective: on every rank
    whole = whole if rank == 1 else sd
    try:
        MaskedAdamW(model.parameters(), masks=mask_set(), model=model).load_state_dict(whole)
        out["mixed"] = None
    except ValueError as exc:
        out["mixed"] = f"{type(exc).__name__}: {exc}"
    # masks that differ across ranks: refused by the fingerprint check, on global masks
    idx = mask_indices()
    if rank == 1:
        idx["2.weight"] = idx["2.weight"][1:]
    try:
        MaskedAdamW(model.parameters(), model=model,
                    masks=MaskSet.from_indices(idx, {n: tuple(params[n].shape) for n in MASKED}))
        out["mismatch"] = None
    except MaskMismatchError as exc:
        out["mismatch"] = str(exc)
    return out


def test_fsdp_refusals(ranks):
    res = ranks.run(_refusals)
    for r in range(2):
        out = res[r]
        assert out["shard1"] is not None and "'0.weight'" in out["shard1"] and "Shard(dim=1)" in out["shard1"], \
            out["shard1"]
        assert "'0.weight'" in out["plain-grad"] and "plain tensor" in out["plain-grad"], out["plain-grad"]
        assert out["plain-grad-atomic"]
        assert out["other-masks"] is not None and "different masks" in out["other-masks"], out["other-masks"]
        assert out["other-masks-atomic"] == 0.0
        assert out["mixed"] is not None and "exchanged state entry" in out["mixed"], out["mixed"]
        assert out["mismatch"] is not None and "'2.weight'" in out["mismatch"] and "50 selected of 1073" in \
            out["mismatch"] and "49 selected" in out["mismatch"], out["mismatch"]
    assert res[0]["shard1-dense"].keys() == res[1]["shard1-dense"].keys()
    assert res[1]["one-rank"].startswith("ValueError") and "parameter groups" in res[1]["one-rank"], res[1]["one-rank"]
    assert res[0]["one-rank"].startswith("RuntimeError") and "failed on rank(s) [1]" in res[0]["one-rank"], \
        res[0]["one-rank"]


# ------------------------------------------------------------------------------------------------
# (5) a replicated DTensor parameter: each rank steps its whole copy
# ------------------------------------------------------------------------------------------------
def _replicated(rank, world):
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = mesh_of(world)
    torch.manual_seed(5)
    w0, grads = torch.randn(7, 5), [torch.randn(7, 5) for _ in range(3)]
    idx = torch.tensor([0, 4, 9, 33, 34], dtype=torch.int32)
    w = nn.Parameter(distribute_tensor(w0.clone(), mesh, [Replicate()]))
    opt = MaskedAdamW([w], masks={w: idx}, **OPT_KW)
    for g in grads:
        w.grad = distribute_tensor(g, mesh, [Replicate()])
        opt.step()
    sd = opt.state_dict()
    plain = nn.Parameter(w0.clone())
    ref = MaskedAdamW([plain], masks={plain: idx}, **OPT_KW)
    for g in grads:
        plain.grad = g.clone()
        ref.step()
    return (torch.equal(w.to_local(), plain.detach()), type(sd["state"][0]["exp_avg"]).__name__,
            torch.equal(sd["state"][0]["exp_avg"], ref.state_dict()["state"][0]["exp_avg"]))


def test_replicated_dtensor_is_stepped_whole(ranks):
    for r, (same, kind, same_state) in enumerate(ranks.run(_replicated)):
        assert same and same_state, f"rank {r}: a replicated DTensor differs from one process"
        assert kind == "Tensor"


# ------------------------------------------------------------------------------------------------
# (6) a tiny open_clip CLIP, one fully_shard per residual block
# ------------------------------------------------------------------------------------------------
CLIP_STEPS = 3


def clip_masks(model) -> dict[str, torch.Tensor]:
    targets = fastmask.find_targets(model)
    g = torch.Generator().manual_seed(11)
    return {n: random_indices(p.numel(), p.numel() // 10, g) for n, p in targets.masked.items()}


def _clip(rank, world):
    from torch.distributed.fsdp import fully_shard

    from .utils import clip_batches, clip_loss, tiny_open_clip

    mesh = mesh_of(world)
    model = tiny_open_clip(0)
    masks = clip_masks(model)
    targets = fastmask.find_targets(model)
    fastmask.freeze(model, targets)
    for tower in (model.visual.transformer, model.transformer):
        for block in tower.resblocks:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params={model.logit_scale})  # FSDP2 refuses scalar parameters
    params = dict(model.named_parameters())
    opt = MaskedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, model=model,
                      masks={params[n]: i for n, i in masks.items()})
    for b in clip_batches(CLIP_STEPS, batch=4):  # the same batch on both ranks: FSDP's average is that gradient
        clip_loss(model, b).backward()
        opt.step()
        opt.zero_grad()
    return full_params(model)


def test_tiny_clip_fsdp_matches_one_process(ranks):
    from .utils import clip_batches, clip_loss, tiny_open_clip

    res = ranks.run(_clip)
    model = tiny_open_clip(0)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = clip_masks(model)
    targets = fastmask.find_targets(model)
    fastmask.freeze(model, targets)
    params = dict(model.named_parameters())
    opt = MaskedAdamW(targets.parameters(), lr=1e-3, model=model, masks={params[n]: i for n, i in masks.items()})
    for b in clip_batches(CLIP_STEPS, batch=4):
        clip_loss(model, b).backward()
        opt.step()
        opt.zero_grad()
    for r in range(2):
        for n, p in params.items():
            assert torch.equal(res[r][n], res[0][n]), f"{n}: rank {r} differs from rank 0"
            assert_close(res[r][n], p.detach(), rtol=1e-4, atol=1e-6, what=f"CLIP {n}: FSDP vs one process")
            if n in masks:
                keep = torch.zeros(p.numel(), dtype=torch.bool)
                keep[masks[n].long()] = True
                assert torch.equal(res[r][n].reshape(-1)[~keep], init[n].reshape(-1)[~keep]), f"{n}: unselected moved"
            elif not p.requires_grad:
                assert torch.equal(res[r][n], init[n]), f"{n}: a frozen parameter moved"


# ------------------------------------------------------------------------------------------------
# (7) fastmask.score on an FSDP2 model: full-shape scores on every rank, equal to one process
# ------------------------------------------------------------------------------------------------
SCORE_STEPS = 3


def _score_fsdp(rank, world):
    model = sharded_mlp(mesh_of(world))
    out = {}
    for mode in ("grad", "abs", "fisher"):
        batches = [tuple(half(t, rank, world) for t in batch(s)) for s in range(SCORE_STEPS)]
        out[mode] = fastmask.score(model, batches, lambda m, b: mse(m, *b), targets=list(MASKED), mode=mode,
                                   progress=False)
    return out


def test_score_on_fsdp_matches_one_process(ranks):
    res = ranks.run(_score_fsdp)
    model = mlp()
    for mode in ("grad", "abs", "fisher"):
        # one process, each step's batch = the ranks' halves together (FSDP2 averages their gradients):
        # the sum over ranks of each step's gradient is WORLD x the full batch's mean-loss gradient
        want = fastmask.score(model, [batch(s) for s in range(SCORE_STEPS)], lambda m, b: WORLD * mse(m, *b),
                              targets=list(MASKED), mode=mode, progress=False)
        for n in MASKED:
            assert res[0][mode][n].shape == dict(model.named_parameters())[n].shape
            assert torch.equal(res[0][mode][n], res[1][mode][n]), f"{mode} {n}: ranks differ"
            assert_close(res[0][mode][n], want[n], rtol=1e-5, atol=1e-6, what=f"{mode} {n} vs one process")
