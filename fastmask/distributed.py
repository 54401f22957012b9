"""Selective updates on ``torch.distributed``: score reduction, mask agreement, a sparse DDP hook.

Everything here runs on PyTorch's own collectives (``all_reduce``, ``all_gather_object``) and DDP's
communication-hook interface; the same code runs with gloo on CPUs and nccl on GPUs. Every
function is a no-op (or a plain local computation) when ``torch.distributed`` is unavailable or
not initialized, so single-process code needs no branches.

- :func:`all_reduce_scores`: sums each rank's accumulated per-entry score statistics across ranks,
  so that every rank selects the same masks from the same numbers.
- :func:`verify_same_masks` and :func:`mask_fingerprint`: a 64-bit fingerprint per mask, compared
  across ranks once per mask change (``MaskedAdamW`` calls it from its constructor, ``set_masks``
  and ``load_state_dict``); ranks whose masks differ raise :class:`MaskMismatchError` naming the
  first differing parameter and the ranks.
- :class:`MaskedAllreduceState` and :func:`masked_allreduce_hook`: a DDP communication hook that
  all-reduces only the selected entries of masked gradients (plus the dense gradients), in one
  compact buffer per bucket.
- FSDP2 (``fully_shard``): :func:`row_shards` says which rows of a DTensor parameter (``Shard(0)``
  on a 1-D mesh, or replicated) this rank holds, :func:`chunk_bounds` gives DTensor's own
  (``torch.chunk``) split of a length, and :func:`exchange` moves a 1-D array split one way over
  the ranks into another split (one ``all_to_all_single``). ``MaskedAdamW`` builds its per-shard
  compact state and its DCP-compatible state dicts on these.
"""
from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import ops

__all__ = [
    "all_reduce_scores", "mask_fingerprint", "verify_same_masks", "MaskMismatchError",
    "MaskedAllreduceState", "masked_allreduce_hook", "resolve_group",
    "RowShards", "row_shards", "is_dtensor", "chunk_bounds", "exchange",
]

_DENSE = -1  # "selected entries" of a dense parameter in fingerprints and messages


def _dist():
    import torch.distributed as dist

    return dist


def resolve_group(process_group: Any = None) -> Any | None:
    """The process group collectives should use, or ``None`` when there is nobody to talk to.

    ``None`` means the default group. Returns ``None`` when ``torch.distributed`` is unavailable or
    not initialized, or when the group has a single rank (nothing to reduce or compare).
    """
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def _global_rank(group: Any, r: int) -> int:
    dist = _dist()
    try:
        return dist.get_global_rank(group, r)
    except (RuntimeError, ValueError):
        return r


# ------------------------------------------------------------------------------------------------
# A. scores
# ------------------------------------------------------------------------------------------------
def all_reduce_scores(scores: Mapping[str, torch.Tensor], mode: str, process_group: Any = None
                      ) -> Mapping[str, torch.Tensor]:
    """Sum accumulated per-entry score statistics across ranks, in place; returns ``scores``.

    Each rank scores its own batches (for instance its shard of a ``DistributedSampler``) into
    ``scores`` and calls this before taking any magnitude and before :func:`fastmask.select`.
    Afterwards every rank holds the same tensors: the sums over every rank's batches, which is
    what scoring the union of all ranks' batches (the concatenated list of batches) on one process
    gives, up to floating-point summation order (each rank adds its batches, then the ranks' sums
    are added). The reduced values are bit-identical on every rank, so ``select`` picks the same
    masks everywhere.

    Args:
        scores: ``{name: tensor}``, every rank with the same names in the same order and the same
            shapes and dtypes (checked with one small collective before the reduction; a mismatch
            raises :class:`MaskMismatchError` naming the first difference instead of hanging).
        mode: the statistic the tensors hold, one of ``fastmask.ops.SCORE_MODES``. All three are
            sums, so all three are reduced by summation, but for ``"grad"`` the tensors must hold
            the **signed** sums ``sum_b g_b``: the paper's score ``|sum_b g_b|`` takes the magnitude
            of the total over all ranks' batches, and ``sum_r |sum_{b in r} g_b|`` would be another
            (larger, order-dependent) score. ``"abs"`` (``sum |g|``) and ``"fisher"`` (``sum g^2``)
            are sums of non-negative terms and may be reduced as they are.
        process_group: the group to reduce over (default: the default group).

    Notes:
        * Score the plain module (``ddp_model.module``), not the DDP wrapper: DDP would average
          the gradients across ranks during backward, before they are folded into the scores.
        * The equivalence with one process holds for scores that add one term per batch. For the
          original SPU code's ``accumulate="running-sum"`` each rank's running sums restart at its
          own first batch: the reduced result is the sum of the ranks' running-sum scores, not the
          running-sum score of one long sequence of batches.
        * One asynchronous ``all_reduce`` per tensor, issued together and then awaited: no flat
          copy of the scores is made (they can be as large as the model's target weights).
        * Without an initialized process group (or with one rank) nothing happens.
    """
    if mode not in ops.SCORE_MODES:
        raise ValueError(f"mode: expected one of {ops.SCORE_MODES}, got {mode!r}")
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores: expected a mapping of names to tensors, got {type(scores).__name__}")
    for name, t in scores.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scores[{name!r}]: expected a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"scores[{name!r}]: expected a floating tensor, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"scores[{name!r}]: expected a contiguous tensor (reduced in place)")
    group = resolve_group(process_group)
    if group is None:
        return scores
    dist = _dist()
    layout = [(str(n), tuple(t.shape), str(t.dtype)) for n, t in scores.items()]
    _agree_on(layout, group, what="all_reduce_scores", item="score tensor",
              describe=lambda e: f"{e[0]!r} of shape {e[1]} and dtype {e[2]}",
              hint="Every rank must pass the same score tensors (names, order, shapes, dtypes)")
    works = [dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True)
             for t in scores.values() if t.numel()]
    for w in works:
        w.wait()
    return scores


# ------------------------------------------------------------------------------------------------
# B. masks agree or fail loudly
# ------------------------------------------------------------------------------------------------
class MaskMismatchError(ValueError):
    """Ranks hold different masks (or different score layouts): collective training would diverge
    or hang, so the call raises on every rank instead."""


def mask_fingerprint(indices: torch.Tensor | None, shape: Sequence[int]) -> int:
    """A 64-bit fingerprint (signed int) of a mask: BLAKE2b of the shape, the number of selected
    entries and the int32 flat indices. ``indices=None`` fingerprints a dense (unmasked) parameter
    of that shape. Computed on the host (device indices are copied once): call it once per mask
    change, never per step."""
    shape = tuple(int(d) for d in shape)
    h = hashlib.blake2b(digest_size=8, person=b"fastmask-mask1")
    h.update(struct.pack(f"<q{len(shape)}q", len(shape), *shape))
    if indices is None:
        h.update(struct.pack("<q", _DENSE))
    else:
        idx = indices.detach().to(device="cpu", dtype=torch.int32).contiguous()
        h.update(struct.pack("<q", idx.numel()))
        if idx.numel():
            h.update(idx.numpy().astype("<i4", copy=False).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def _digest(entries: Sequence[Any]) -> int:
    h = hashlib.blake2b(digest_size=8, person=b"fastmask-list1")
    h.update(repr(list(entries)).encode())
    return int.from_bytes(h.digest(), "little", signed=True)


def _agree_on(entries: Sequence[Any] | None, group: Any, *, what: str, item: str, describe,
              hint: str, key=lambda e: e, failed: bool = False) -> None:
    """Every rank of ``group`` must pass equal ``entries`` (a list of small picklable tuples whose
    first field labels the entry in messages), compared by ``key(entry)``.

    One ``all_gather_object`` of ``(failed, len, digest)``; only when the digests differ, a second
    one of the entries themselves, to name the first difference. A rank that ``failed`` locally
    still takes part, so the others raise at once instead of waiting for the process group's
    timeout; the failing rank returns and re-raises its own error.
    """
    dist = _dist()
    world = dist.get_world_size(group)
    keys = None if entries is None else [key(e) for e in entries]
    head = (bool(failed), -1 if keys is None else len(keys), 0 if keys is None else _digest(keys))
    heads: list[Any] = [None] * world
    dist.all_gather_object(heads, head, group=group)
    bad = [_global_rank(group, r) for r, h in enumerate(heads) if h[0]]
    if failed:
        return
    if bad:
        raise RuntimeError(
            f"{what}: failed on rank(s) {bad} (see the error raised there); nothing was changed on this rank")
    if all(h[1:] == heads[0][1:] for h in heads):
        return
    lists: list[Any] = [None] * world
    dist.all_gather_object(lists, list(entries), group=group)
    ranks = [_global_rank(group, r) for r in range(world)]
    n = max(len(x) for x in lists)
    for i in range(n):
        got = [x[i] if i < len(x) else None for x in lists]
        if all((g is None) == (got[0] is None) and (g is None or key(g) == key(got[0])) for g in got):
            continue
        label = next(g[0] for g in got if g is not None)
        parts = "; ".join(f"rank {rk}: {describe(g) if g is not None else 'nothing (fewer entries)'}"
                          for rk, g in zip(ranks, got))
        raise MaskMismatchError(f"{what}: ranks disagree at {item} {i} ({label}): {parts}. {hint}")
    raise MaskMismatchError(f"{what}: ranks disagree ({[h[1:] for h in heads]})")  # pragma: no cover


def _describe_mask(e) -> str:
    _, shape, k, fp = e
    what = "dense (no mask)" if k == _DENSE else f"{k} selected of {math.prod(shape)}"
    return f"{what}, shape {shape}, fingerprint {fp & (2**64 - 1):016x}"


def verify_same_masks(masks: Sequence[tuple[str, torch.Size | Sequence[int], torch.Tensor | None]] | None,
                      process_group: Any = None, *, what: str = "masks", failed: bool = False) -> None:
    """Check that every rank holds the same masks; raise :class:`MaskMismatchError` otherwise.

    ``masks`` lists, in a rank-independent order, ``(name, shape, indices or None for a dense
    parameter)``. Each mask is fingerprinted on the host (:func:`mask_fingerprint`) and one small
    ``all_gather_object`` compares the lists' digests (a second one names the first difference
    when they differ). Collective: every rank of the group must call it. A rank that failed
    before it could build its masks passes ``failed=True`` (and ``masks=None``): it still takes
    part, so the others raise a ``RuntimeError`` naming it instead of hanging. No-op without an
    initialized process group.
    """
    group = resolve_group(process_group)
    if group is None:
        return
    entries = None
    if not failed:
        entries = [(str(name), tuple(int(d) for d in shape), _DENSE if idx is None else int(idx.numel()),
                    mask_fingerprint(idx, shape)) for name, shape, idx in masks]  # type: ignore[union-attr]
    _agree_on(entries, group, what=what, item="parameter", describe=_describe_mask, key=lambda e: e[1:],
              failed=failed, hint="Every rank must hold the same masks: select them from scores reduced with "
              "fastmask.distributed.all_reduce_scores, or load the same MaskSet file on every rank")


# ------------------------------------------------------------------------------------------------
# C. DDP communication hook
# ------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """How one bucket's buffer maps to its compact buffer: dense runs first, then the selected
    entries of the masked params (buffer positions ``sel``, ascending)."""

    key: tuple[int, ...]  # ids of the bucket's params, in order
    numel: int  # of the bucket buffer
    version: Any
    dense_runs: list[tuple[int, int]]  # (start, end) in the buffer, merged
    masked_runs: list[tuple[int, int]]  # zeroed before the reduced selected entries are scattered
    sel: torch.Tensor  # int64 positions in the buffer
    n_dense: int

    @property
    def numel_compact(self) -> int:
        return self.n_dense + self.sel.numel()


def _merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in runs:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class MaskedAllreduceState:
    """State of :func:`masked_allreduce_hook`: which gradient entries each DDP bucket reduces.

    Build it from the optimizer (``MaskedAllreduceState(opt)``) so that it follows the optimizer's
    current masks: the per-bucket plans are rebuilt whenever ``opt.mask_version`` changes
    (:meth:`~fastmask.optim.MaskedAdamW.set_masks`, masks adopted by ``load_state_dict``) and
    whenever DDP rebuilds its buckets. Or build it from masks directly: a ``{Parameter: flat
    indices}`` mapping, or a :class:`~fastmask.MaskSet` with ``model=`` (the unwrapped module).

    Args:
        source: a :class:`~fastmask.optim.MaskedAdamW` (or any object with ``masks`` and
            ``mask_version``), or masks as above.
        model: the module a MaskSet's names refer to.
        process_group: the group to reduce over (default: the default group); use DDP's group.

    Attributes ``bytes_reduced`` and ``calls`` count the bytes all-reduced and the buckets
    reduced so far on this rank (for logging and benchmarks).
    """

    def __init__(self, source: Any, *, model: nn.Module | None = None, process_group: Any = None) -> None:
        from .masks import MaskSet

        self.process_group = process_group
        self._opt = None
        self._masks: dict[nn.Parameter, torch.Tensor] = {}
        if hasattr(source, "masks") and hasattr(source, "mask_version"):
            self._opt = source
            self._check_optimizer()
        elif isinstance(source, MaskSet):
            if model is None:
                raise ValueError("source: a MaskSet needs model= (the unwrapped module) to map names to parameters")
            self._masks = dict(source.for_model(model))
        elif isinstance(source, Mapping):
            for p, idx in source.items():
                if not isinstance(p, torch.Tensor) or not isinstance(idx, torch.Tensor):
                    raise TypeError("source: expected {Parameter: index tensor}")
                from ._checks import check_indices

                check_indices(idx, p.numel(), "source[mask]")
            self._masks = dict(source)
        else:
            raise TypeError(f"source: expected a MaskedAdamW, a MaskSet or {{Parameter: indices}}, "
                            f"got {type(source).__name__}")
        for p in self._masks:
            if p.is_complex():
                raise NotImplementedError("masked_allreduce_hook: complex masked parameters are not supported")
        self._plans: dict[int, _Plan] = {}
        self.bytes_reduced = 0
        self.calls = 0

    def __setstate__(self, state):  # DDP may pickle hook states; plans are rebuilt on demand
        self.__dict__.update(state)
        self._plans = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_plans"] = {}
        state["process_group"] = None
        return state

    def _check_optimizer(self) -> None:
        if getattr(self._opt, "track_scores", None):
            raise ValueError(
                "masked_allreduce_hook: the optimizer tracks scores (track_scores=...), which needs every "
                "entry's reduced gradient; this hook reduces only the selected entries (and zeroes the "
                "others). Use plain DDP, or score with fastmask.score + all_reduce_scores")

    def _current(self) -> tuple[Any, Mapping[nn.Parameter, torch.Tensor]]:
        if self._opt is not None:
            self._check_optimizer()
            return self._opt.mask_version, self._opt.masks
        return 0, self._masks

    def _plan(self, bucket: Any) -> _Plan:
        params = bucket.parameters()
        buffer = bucket.buffer()
        key = tuple(id(p) for p in params)
        version, masks = self._current()
        plan = self._plans.get(bucket.index())
        if plan is not None and plan.key == key and plan.version == version and plan.numel == buffer.numel():
            return plan
        base = buffer.storage_offset()
        dense, masked, sel = [], [], []
        n_dense = 0
        for p, g in zip(params, bucket.gradients()):
            start = g.storage_offset() - base
            end = start + g.numel()
            idx = masks.get(p)
            if idx is None:
                dense.append((start, end))
                n_dense += end - start
                continue
            if p.is_complex() or g.is_complex():
                raise NotImplementedError("masked_allreduce_hook: complex masked parameters are not supported")
            if g.numel() != p.numel():
                raise RuntimeError(f"masked_allreduce_hook: a bucket gradient of {g.numel()} entries for a "
                                   f"parameter of {p.numel()}")
            masked.append((start, end))
            if idx.numel():
                sel.append(idx.to(device=buffer.device, dtype=torch.int64) + start)
        plan = _Plan(
            key=key, numel=buffer.numel(), version=version, dense_runs=_merge(dense), masked_runs=_merge(masked),
            sel=torch.cat(sel) if sel else torch.empty(0, dtype=torch.int64, device=buffer.device), n_dense=n_dense,
        )
        self._plans[bucket.index()] = plan
        return plan


def masked_allreduce_hook(state: MaskedAllreduceState, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average only the selected entries of masked gradients.

    Register with ``ddp_model.register_comm_hook(MaskedAllreduceState(opt), masked_allreduce_hook)``.
    For each bucket it gathers the dense parameters' gradients and the selected entries of each
    masked parameter's gradient into one compact buffer, divides it by the world size (as DDP's
    default hook does), all-reduces it asynchronously, and scatters the result back into the
    bucket buffer, whose Future it returns. The averaged selected entries and dense gradients
    equal plain DDP's (the same values are summed; with two ranks bit for bit).

    **Unselected entries are zeroed**: after the hook, every masked gradient is the averaged
    gradient at its selected entries and 0 elsewhere, identical on every rank. ``MaskedAdamW``
    never reads them (its step gathers only the selected entries), but zeros keep anything else
    that looks at the whole gradient consistent across ranks: ``GradScaler``'s inf check (a
    rank-local stale value could skip a step on one rank only), gradient clipping norms (they see
    only the reduced entries, the same on every rank), logging. ``track_scores`` needs every
    entry's gradient and is refused by :class:`MaskedAllreduceState`.

    A bucket whose masked parameters all have empty masks and that holds no dense parameter
    sends nothing. Masks must agree across ranks (``MaskedAdamW`` checks it whenever they change),
    otherwise the compact buffers differ in size. Complex masked parameters are not supported.
    """
    dist = _dist()
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    plan = state._plan(bucket)
    if not plan.masked_runs:  # dense only: DDP's default behaviour
        buffer.div_(world)
        state.bytes_reduced += buffer.numel() * buffer.element_size()
        state.calls += 1
        return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])

    compact = torch.empty(plan.numel_compact, dtype=buffer.dtype, device=buffer.device)
    pos = 0
    for a, b in plan.dense_runs:
        compact[pos : pos + b - a].copy_(buffer[a:b])
        pos += b - a
    if plan.sel.numel():
        torch.index_select(buffer, 0, plan.sel, out=compact[plan.n_dense :])
    compact.div_(world)

    def scatter(reduced: torch.Tensor) -> torch.Tensor:
        pos = 0
        for a, b in plan.dense_runs:
            buffer[a:b].copy_(reduced[pos : pos + b - a])
            pos += b - a
        for a, b in plan.masked_runs:
            buffer[a:b].zero_()
        if plan.sel.numel():
            buffer.index_copy_(0, plan.sel, reduced[plan.n_dense :])
        return buffer

    if compact.numel() == 0:  # every rank agrees (same masks): nothing to send
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(scatter(compact))
        return fut
    state.bytes_reduced += compact.numel() * compact.element_size()
    state.calls += 1
    work = dist.all_reduce(compact, group=group, async_op=True)
    return work.get_future().then(lambda fut: scatter(fut.value()[0]))


# DDP's register_comm_hook inspects the hook's annotations, and this module's are strings
# (``from __future__ import annotations``): give it the objects it compares against.
if torch.distributed.is_available():
    masked_allreduce_hook.__annotations__ = {
        "state": MaskedAllreduceState, "bucket": torch.distributed.GradBucket,
        "return": torch.futures.Future[torch.Tensor],
    }


# ------------------------------------------------------------------------------------------------
# D. FSDP2: DTensor parameters sharded by rows
# ------------------------------------------------------------------------------------------------
_DTENSOR: list[type] = []  # the DTensor class, once looked up (none where torch.distributed is absent)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False where DTensor does not exist)."""
    if not _DTENSOR:
        if not torch.distributed.is_available():
            return False
        from torch.distributed.tensor import DTensor

        _DTENSOR.append(DTensor)
    return isinstance(t, _DTENSOR[0])


def chunk_bounds(n: int, world: int) -> list[int]:
    """``world + 1`` boundaries of DTensor's ``Shard(0)`` split of ``n`` items over ``world`` ranks
    (``torch.chunk``'s: ``ceil(n / world)`` per rank, the last ranks get fewer or none); rank ``r``
    holds ``[bounds[r], bounds[r + 1])``. FSDP2 splits parameter rows the same way."""
    from torch.distributed.tensor import Shard

    out = [0]
    for r in range(world):
        size, offset = Shard.local_shard_size_and_offset(n, world, r)
        out.append(int(offset) + int(size))
    return out


@dataclass(frozen=True)
class RowShards:
    """How a parameter's rows (dim 0) are split over the ranks of a 1-D device mesh.

    ``world == 1`` means this rank holds the whole tensor (a plain tensor, a replicated DTensor, or
    a mesh of one rank). Otherwise rank ``r`` (its coordinate on the mesh) holds rows
    ``[row_bounds[r], row_bounds[r + 1])``, i.e. the flat entries ``[flat_bounds[r],
    flat_bounds[r + 1])`` of ``param.reshape(-1)``, and its local tensor's flat index ``j`` is the
    global flat index ``flat_bounds[r] + j``.
    """

    world: int
    coord: int
    row_bounds: tuple[int, ...]
    row_numel: int

    @property
    def flat_bounds(self) -> list[int]:
        return [b * self.row_numel for b in self.row_bounds]

    @property
    def flat_lo(self) -> int:
        return self.row_bounds[self.coord] * self.row_numel


def row_shards(p: torch.Tensor, name: str = "parameter") -> RowShards | None:
    """The row split of a DTensor parameter, or ``None`` for a plain tensor.

    Supported: ``Shard(0)`` on a 1-D mesh (FSDP2's ``fully_shard``, even or uneven: DTensor's
    ``torch.chunk`` layout, the local tensor being this rank's rows without FSDP2's padding) and
    ``Replicate()`` (each rank holds, and steps, the whole tensor). Anything else (``Shard(1)``,
    ``Partial``, 2-D meshes such as HSDP or FSDP + TP, strided shards) raises
    ``NotImplementedError`` naming the parameter: the selected entries of such a shard are not a
    contiguous part of the mask, and their state would need another layout.
    """
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = p.device_mesh, tuple(p.placements)
    supported = "Shard(0) over a 1-D device mesh (FSDP2's fully_shard) or Replicate()"
    if mesh.ndim != 1 or len(placements) != 1:
        raise NotImplementedError(
            f"{name} is a DTensor on a {mesh.ndim}-D device mesh with placements {placements}; a masked "
            f"DTensor parameter must be placed as {supported} (HSDP and FSDP + TP meshes are not supported)")
    pl = placements[0]
    shape = tuple(p.shape)
    if isinstance(pl, Replicate) or (type(pl) is Shard and pl.dim == 0 and mesh.size() == 1):
        return RowShards(1, 0, (0, shape[0] if shape else 1), math.prod(shape[1:]))
    if type(pl) is not Shard or pl.dim != 0 or not shape:
        raise NotImplementedError(f"{name} is a DTensor placed as {pl!r} on its mesh; a masked DTensor parameter "
                                  f"must be placed as {supported}")
    coord = mesh.get_local_rank()
    world = mesh.size()
    bounds = tuple(chunk_bounds(shape[0], world))
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    local = p.to_local()
    expected = (bounds[coord + 1] - bounds[coord], *shape[1:])
    if tuple(local_shape) != expected or tuple(local.shape) != expected or int(offset[0]) != bounds[coord]:
        raise NotImplementedError(
            f"{name}: this rank's shard has shape {tuple(local.shape)} at row {int(offset[0])}, not the "
            f"torch.chunk split of {shape[0]} rows over {world} ranks (rows {bounds[coord]}:{bounds[coord + 1]})")
    return RowShards(world, coord, bounds, math.prod(shape[1:]))


def exchange(local: torch.Tensor, have: Sequence[int], want: Sequence[int], mesh: Any) -> torch.Tensor:
    """Re-split a 1-D array over the ranks of a 1-D device mesh; returns this rank's new part.

    The array has ``have[-1] == want[-1]`` items; the rank at mesh coordinate ``c`` holds
    ``[have[c], have[c + 1])`` (``local``) and receives ``[want[c], want[c + 1])``. Both splits
    must be known on every rank. One ``all_to_all_single`` on the mesh's group (none when the array
    is empty); collective: every rank of the mesh must call it, in the same order.
    """
    dist = _dist()
    if have[-1] != want[-1] or len(have) != len(want):
        raise ValueError(f"exchange: splits of different arrays ({list(have)} and {list(want)})")
    coord = mesh.get_local_rank()
    if local.dim() != 1 or local.numel() != have[coord + 1] - have[coord]:
        raise ValueError(f"exchange: this rank holds {tuple(local.shape)}, expected ({have[coord + 1] - have[coord]},)")
    out = local.new_empty(want[coord + 1] - want[coord])
    if want[-1] == 0:
        return out
    group = mesh.get_group()
    world = len(have) - 1
    # all_to_all_single orders the pieces by group rank, which need not be the mesh coordinate
    ranks = [int(r) for r in mesh.mesh.reshape(-1).tolist()]
    order = sorted(range(world), key=lambda c: dist.get_group_rank(group, ranks[c]))

    def overlap(a0, a1, b0, b1):
        lo, hi = max(a0, b0), min(a1, b1)
        return (lo, hi) if hi > lo else (a0, a0)

    send = [overlap(have[coord], have[coord + 1], want[c], want[c + 1]) for c in order]
    recv = [overlap(want[coord], want[coord + 1], have[c], have[c + 1]) for c in order]
    src = local.contiguous()
    send_buf = torch.cat([src[a - have[coord]: b - have[coord]] for a, b in send]) if send else src
    recv_buf = local.new_empty(out.numel())
    dist.all_to_all_single(recv_buf, send_buf, [b - a for a, b in recv], [b - a for a, b in send], group=group)
    pos = 0
    for a, b in recv:  # each piece to its place (in coordinate order the pieces are already in place)
        out[a - want[coord]: b - want[coord]].copy_(recv_buf[pos: pos + b - a])
        pos += b - a
    return out
