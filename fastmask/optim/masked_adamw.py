"""MaskedAdamW: AdamW whose masked parameters change only at their selected entries.

State layout. The masked parameters of one param group are bucketed by (device, dtype). A bucket
owns flat buffers laid out back to back over its tensors (the compact layout of
:mod:`fastmask.ops`): ``idx`` (int32 mask indices), ``exp_avg`` and ``exp_avg_sq`` (one entry per
selected entry; float32, float64 for float64/complex128 params), one float32 step count per
tensor, and the host list of segment offsets. Each masked parameter's ``optimizer.state[p]``
holds *views* into these buffers, so ``state_dict()`` looks like ``torch.optim.AdamW``'s (plus
``mask_indices`` and ``param_shape``, all tensors), and a step over a bucket is one op call.
Complex parameters are stepped as ``torch.view_as_real`` (as AdamW does): their compact state has
two real entries (real, imaginary) per selected entry.

Parameters without a mask are updated densely by :func:`torch.optim.adam.adam` with the group's
``foreach``/``fused``/``capturable`` flags, exactly as ``torch.optim.AdamW`` with those flags
would, except that ``fused=True`` is used only where the fused kernel is correct (params, grads
and state of one layout without gaps); other params of that group take torch's non-fused default.

Under ``torch.distributed`` every rank must hold the same masks: the constructor, ``set_masks`` and
a ``load_state_dict`` that may adopt masks compare a 64-bit fingerprint of each mask across the
ranks of ``process_group`` (one small collective per mask change, never per step) and raise
:class:`fastmask.distributed.MaskMismatchError` naming the first differing parameter.

Every step is validated as a whole before anything is written: a step that raises leaves
parameters and state as they were (likewise :meth:`MaskedAdamW.load_state_dict` and
:meth:`MaskedAdamW.set_masks`).

FSDP2 (``fully_shard``: DTensor parameters sharded ``Shard(0)`` over a 1-D mesh, possibly
unevenly). Masks stay global (flat indices into the whole parameter, the same on every rank).
Because a mask is sorted and a rank holds a contiguous range of rows, the selected entries inside
rank ``r``'s rows ``[r0, r1)`` are one contiguous part ``mask[b_r:b_{r+1}]`` of the mask; the rank
keeps compact state for that part only, and steps it with the masked op on ``p.to_local()`` and
``p.grad.to_local()`` at the local flat indices ``i - r0 * row_numel``, without communication.
So the compact arrays are a split of the single-process compact array, with per-rank lengths set by
the mask, not by DTensor's ``torch.chunk`` rule. DTensor cannot describe such a split
(``from_local(..., shape=...)`` with these lengths gives DTensors whose ``full_tensor()`` fails and
that ``dcp.save`` refuses), and plain per-rank tensors are worse: DCP takes a plain tensor for a
replica and saves rank 0's only, so the other ranks would load rank 0's state. ``state_dict()``
therefore re-splits each compact array into DTensor's own layout (one ``all_to_all_single``) and
returns DTensors of the whole compact array: sharded DCP checkpoints, ``full_state_dict=True``
(which then equals the single-process state dict), and loading into another number of ranks all
work with PyTorch's own machinery, at the cost of ``state_dict()``/``load_state_dict()`` being
collective for such optimizers (as ``get_optimizer_state_dict`` is anyway). See
:meth:`MaskedAdamW.state_dict`.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .. import distributed as _dist
from .. import ops
from .._checks import check_indices
from ..masks import MaskSet

__all__ = ["MaskedAdamW", "no_step_in_backward"]

_SCORE_MODES = ops.SCORE_MODES
_MASKED_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass(frozen=True)
class _Local:
    """Which selected entries of a masked parameter this rank holds and steps: all of them, unless the
    parameter is a DTensor sharded by rows (FSDP2), whose rank ``r`` holds the part
    ``mask[bounds[r]:bounds[r + 1]]`` of the (sorted, global) mask that falls in its rows."""

    rows: _dist.RowShards | None  # None: a plain tensor
    bounds: tuple[int, ...]  # world + 1 positions in the mask

    @property
    def sharded(self) -> bool:
        return self.rows is not None and self.rows.world > 1

    @property
    def lo(self) -> int:
        return self.bounds[self.rows.coord] if self.sharded else 0  # type: ignore[union-attr]

    @property
    def hi(self) -> int:
        return self.bounds[self.rows.coord + 1] if self.sharded else self.bounds[-1]  # type: ignore[union-attr]


def _local_part(p: torch.Tensor, idx: torch.Tensor, name: str) -> _Local:
    rows = _dist.row_shards(p, name)
    if rows is None or rows.world == 1:
        return _Local(rows, (0, idx.numel()))
    flat = torch.tensor(rows.flat_bounds, dtype=torch.int64, device=idx.device)
    bounds = torch.searchsorted(idx.to(torch.int64), flat).tolist()  # once per mask change
    bounds[0], bounds[-1] = 0, idx.numel()
    return _Local(rows, tuple(int(b) for b in bounds))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view that writes through), or the tensor itself."""
    return t.to_local() if _dist.is_dtensor(t) else t


@dataclass
class _Bucket:
    """Compact state of the masked params of one group that share a device and dtype."""

    group: int
    params: list[nn.Parameter]
    offsets: list[int]  # host, len(params) + 1, in this rank's kernel entries (2 per selected entry if complex)
    mask_offsets: list[int]  # host, len(params) + 1, in selected entries of the (global) masks
    idx: torch.Tensor  # int32 [K]: the masks (flat indices into each whole param)
    kidx: torch.Tensor  # int32 [k or 2k]: what the op steps in this rank's tensors (idx, or 2i, 2i+1 for complex)
    exp_avg: torch.Tensor  # [K or 2K]
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor | None  # amsgrad only
    steps: torch.Tensor  # fp32 [T], on the params' device
    scores: list[torch.Tensor] | None  # fp32, the shape of this rank's tensor, track_scores only
    is_complex: bool = False
    parts: list[_Local] | None = None  # per param; None: every param is whole on this rank

    def part(self, t: int) -> _Local:
        if self.parts is not None:
            return self.parts[t]
        return _Local(None, (0, self.mask_offsets[t + 1] - self.mask_offsets[t]))


_suspended = [0]  # no_step_in_backward() depth: a global (autograd may run hooks on its own threads)


@contextlib.contextmanager
def no_step_in_backward() -> Iterator[None]:
    """Inside this context, no ``MaskedAdamW(step_in_backward=True)`` steps from backward passes
    (gradients are left in ``.grad`` as usual). :func:`fastmask.score` runs inside it, so that
    scoring a model whose optimizer steps in backward computes scores and changes nothing."""
    _suspended[0] += 1
    try:
        yield
    finally:
        _suspended[0] -= 1


def _backward_hook(ref: Callable[[], Any], p: torch.Tensor) -> None:
    """Post-accumulate-grad hook of ``MaskedAdamW(step_in_backward=True)``."""
    opt = ref()
    if opt is None or opt._accumulating or _suspended[0]:
        return
    try:
        opt._once_per_backward(p)
        opt._step_one(p)
    except BaseException:
        opt._reset_backward_window()  # the failed backward's end callbacks never run
        raise


def _backward_done(ref: Callable[[], Any], task: int) -> None:
    """End-of-graph-task callback: the window closes when every graph task it saw has ended."""
    opt = ref()
    if opt is not None:
        opt._live_tasks.discard(task)
        if not opt._live_tasks:
            opt._stepped_in_window.clear()


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of consecutive True flags."""
    out, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.empty(0, dtype=dtype).real.dtype if dtype.is_complex else dtype


def _is_dense_layout(t: torch.Tensor) -> bool:
    """Non-overlapping and without gaps (any dimension order): memory is one linear run."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _check_scalar(name: str, value: Any, *, upper: float | None = None) -> None:
    """``0 <= value (< upper)`` for a float or a one-element tensor (read only on the CPU)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: a tensor {name} must have one element, got shape {tuple(value.shape)}")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name}: expected a floating tensor, got {value.dtype}")
        if value.device.type != "cpu":
            return  # reading it would sync the host: checked when the optimizer was built
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float or a one-element tensor, got {type(value).__name__}")
    ok = 0.0 <= value and (upper is None or value < upper)  # NaN fails both
    if not ok:
        span = f"[0, {upper})" if upper is not None else "[0, inf)"
        raise ValueError(f"{name}: invalid value {value}; expected a number in {span}")


class MaskedAdamW(torch.optim.Optimizer):
    r"""AdamW that updates only selected entries of masked parameters, with state only for them.

    Constructed like :class:`torch.optim.AdamW` (same arguments, same checks), plus:

    Args:
        masks: ``{Parameter: 1-D integer tensor of flat indices}`` (sorted, unique; positions in
            ``param.reshape(-1)``), or a :class:`~fastmask.MaskSet` together with ``model``.
            Masked parameters keep state for their selected entries only and change only there;
            parameters without a mask are updated densely. Any real floating or complex dtype and
            any layout can be masked: contiguous float32/bfloat16/float16 parameters take the
            compiled kernels, the others the reference backend (``fastmask.backends.report()``).
        model: the model the MaskSet's names refer to; also used to name parameters in errors and
            in :meth:`scores` (named parameters given as ``params`` serve the same purpose).
        decay_unselected: if ``True`` (per group), weight decay also shrinks the unselected entries
            of masked parameters, as the original SPU code's dense AdamW did. Off by default:
            unselected entries stay bit-exact.
        track_scores: ``"grad"``, ``"abs"`` or ``"fisher"`` to accumulate, in the same pass as the
            step, every entry's gradient statistic of the masked parameters (full-shape fp32);
            :meth:`scores` returns them for :func:`fastmask.select`.
        foreach, fused, capturable: as in ``torch.optim.AdamW``, for the parameters without a mask
            (masked parameters always take fastmask's multi-tensor op, which never syncs the
            host). The defaults (``None``) make torch's own choice, so dense parameters are
            bit-identical to ``torch.optim.AdamW`` with the same arguments; ``fused=True`` is
            faster and is applied only where PyTorch's fused kernel is correct.
        differentiable: only ``False`` (the step writes in place, outside autograd).
        process_group: the ``torch.distributed`` group whose ranks must hold the same masks
            (default ``None``: the default group, if one is initialized when masks change).
        verify_masks: ``True`` (default): when a process group of more than one rank is
            initialized, the constructor, :meth:`set_masks` and a :meth:`load_state_dict` that may
            adopt masks are **collective** calls: each rank fingerprints its masks on the host
            (:func:`fastmask.distributed.mask_fingerprint`) and one ``all_gather_object``
            compares them; a rank whose masks differ makes every rank raise
            :class:`~fastmask.distributed.MaskMismatchError` naming the first differing
            parameter and each rank's mask, before anything changes; a rank that fails its own
            checks still takes part, so the others raise at once instead of waiting for the
            group's timeout. ``False``: no check and no collective (e.g. an optimizer built on
            one rank only, or masks that differ on purpose; the sparse DDP hook needs equal masks).
        step_in_backward: ``True`` to step every parameter inside ``loss.backward()``, from a
            post-accumulate-grad hook, as soon as its gradient is complete, and free that gradient
            at once: at most one parameter's gradient exists at any time (see below).

    **FSDP2** (``torch.distributed.fsdp.fully_shard``): parameters may be DTensors. A masked one must
    be sharded ``Shard(0)`` over a 1-D device mesh (evenly or not) or replicated; other placements
    (``Shard(1)``, 2-D meshes as in HSDP or FSDP + TP) raise ``NotImplementedError`` naming it.
    Masks stay global: ``masks=``, :attr:`masks` and the state dict's ``mask_indices`` are flat
    indices into the whole parameter, and the mask check compares them across ranks. Each rank
    keeps compact state only for the selected entries inside its own rows (``state[p]``'s
    ``exp_avg``/``exp_avg_sq`` hold those; its ``mask_indices`` the whole mask) and steps them on
    ``p.to_local()``, without communication. Dense DTensor parameters are stepped by torch's AdamW
    functional as ``torch.optim.AdamW`` steps them. :meth:`state_dict` and :meth:`load_state_dict`
    work with ``torch.distributed.checkpoint`` (``get_optimizer_state_dict``/``dcp.save``/
    ``dcp.load``/``set_optimizer_state_dict``, sharded or ``full_state_dict=True``) and are
    collective calls for such parameters. Build the optimizer after ``fully_shard``.

    While the optimizer has masks, every trainable dense parameter has state from the start: the
    fresh state (zeros, step 0) its first step would create, so steps are unchanged.
    ``torch.distributed.checkpoint``'s state-dict helpers create missing state (by a zero-gradient
    step) only for an optimizer whose ``state`` is empty, which a masked optimizer's never is;
    without this, a checkpoint template would list no state for those parameters and
    ``set_optimizer_state_dict`` would refuse it (or, with ``flatten_optimizer_state_dict=True``,
    silently load none).

    **Step in the backward pass** (``step_in_backward=True``). Each trainable parameter (masked or
    dense) gets a post-accumulate-grad hook that steps it exactly as :meth:`step` would (same op,
    same rounding: the results are bit-identical to ``backward()`` then ``step()``) and then sets
    its ``.grad`` to ``None``, so the gradients of a large model never exist all at once. The loop
    stays the ordinary one: ``loss.backward()`` steps, ``step()`` finds no gradient left and does
    nothing (it still steps gradients set by other means), ``zero_grad()``, LR schedulers (they
    change ``lr`` between backward passes), ``state_dict()`` and ``set_masks`` work as usual.

    - Gradient accumulation: run the micro-batches' backward passes but the last inside
      ``with opt.accumulating():`` (gradients accumulate, nothing is stepped); the last backward
      steps every parameter with its accumulated gradient. (Or run all of them inside it and
      call ``step()``.)
    - One backward per step: a second ``backward()`` (another loss, ``retain_graph``) outside
      ``accumulating()`` steps the parameters again.
    - Cannot work, because every gradient is gone before the backward pass returns: global
      gradient-norm clipping (``clip_grad_norm_`` would see no gradient and silently clip
      nothing; clip per tensor instead, from a post-accumulate-grad hook registered *before* the
      optimizer is built, which therefore runs first: ``def clip(p): clip_grad_norm_([p], 1.0)``,
      then ``p.register_post_accumulate_grad_hook(clip)`` for each parameter; such a hook must
      return ``None``, so not a ``lambda`` returning the norm), and ``torch.amp.GradScaler`` (its inf check
      would come after the step: ``scaler.step(opt)`` raises ``RuntimeError``; train in bf16
      autocast, which needs no scaler). Under ``torch.distributed`` with more than one rank (DDP,
      FSDP2) the hook would see this rank's gradient before it is reduced: refused with
      ``NotImplementedError``.
    - Each parameter's step is checked before it writes, but the step is spread over the
      backward pass: a bad gradient raises after the parameters stepped before it.

    ``lr`` may be a tensor (kept as is, so compiled steps need not recompile; a CPU tensor lr is
    checked on every step, a device one when the optimizer is built, to avoid a host sync).
    Works with LR schedulers, closures and ``torch.amp.GradScaler`` (``scaler.step(opt)`` hands
    the scale and the inf flag to the step, which skips without a host sync). Change masks
    between tasks with :meth:`set_masks`, which re-creates the compact state. A parameter may be
    listed only once (``torch.optim.AdamW`` would step a repeated one twice).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        masks: MaskSet | Mapping[nn.Parameter, torch.Tensor] | None = None,
        model: nn.Module | None = None,
        decay_unselected: bool = False,
        track_scores: str | None = None,
        process_group: Any = None,
        verify_masks: bool = True,
        step_in_backward: bool = False,
    ) -> None:
        if differentiable:
            raise NotImplementedError(
                "differentiable: MaskedAdamW steps parameters in place outside autograd; differentiable=True "
                "is not supported (use torch.optim.AdamW(differentiable=True) for meta-learning)")
        if fused and foreach:
            raise RuntimeError("fused, foreach: `fused` and `foreach` cannot be `True` together")
        if isinstance(lr, torch.Tensor):
            if foreach and not capturable:
                raise ValueError("lr: lr as a Tensor is not supported for capturable=False and foreach=True")
            if lr.numel() != 1:
                raise ValueError("lr: Tensor lr must be 1-element")
            if lr.device.type != "cpu" and not bool(0.0 <= lr):  # once, here: never inside step()
                raise ValueError(f"lr: invalid learning rate {lr}")
        _check_scalar("lr", lr)
        _check_scalar("eps", eps)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
            raise ValueError("betas: betas must be either both floats or both Tensors")
        if isinstance(betas[0], torch.Tensor) and foreach and not capturable:
            raise ValueError("betas: betas[0] as a Tensor is not supported for capturable=False and foreach=True")
        for i, b in enumerate(betas):
            _check_scalar(f"betas[{i}]", b, upper=1.0)
        _check_scalar("weight_decay", weight_decay)
        if track_scores is not None and track_scores not in _SCORE_MODES:
            raise ValueError(f"track_scores: expected None or one of {_SCORE_MODES}, got {track_scores!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decay_unselected=decay_unselected)
        self.track_scores = track_scores
        self._buckets: list[_Bucket] = []
        self._mask_of: dict[nn.Parameter, torch.Tensor] = {}
        self._names: dict[nn.Parameter, str] = {}
        self._process_group = process_group
        self._verify_masks = bool(verify_masks)
        self._mask_version = 0
        if not isinstance(step_in_backward, bool):
            raise TypeError(f"step_in_backward: expected a bool, got {type(step_in_backward).__name__}")
        self._step_in_backward = step_in_backward
        self._accumulating = 0
        self._hooks: dict[nn.Parameter, Any] = {}
        self._reset_backward_window()
        if step_in_backward and _dist.resolve_group(process_group) is not None:
            raise NotImplementedError(
                "step_in_backward: not supported under torch.distributed with more than one rank: a "
                "post-accumulate-grad hook sees this rank's own gradient, before DDP or FSDP reduce it. Use "
                "step_in_backward=False (with fastmask.distributed.masked_allreduce_hook under DDP)")
        super().__init__(params, defaults)
        # GradScaler passes grad_scale/found_inf to step() instead of unscaling and syncing.
        self._step_supports_amp_scaling = True
        self._set_masks(masks if masks is not None else {}, model, "MaskedAdamW()")
        self._init_missing_dense_state()
        if step_in_backward:  # last: a constructor that raises leaves no hooks behind
            self._register_hooks()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; a parameter listed twice is an error."""
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if params is not None and not isinstance(params, (torch.Tensor, set)):
            params = list(params)
            seen: set[int] = set()
            for i, item in enumerate(params):
                p = item[1] if isinstance(item, tuple) and len(item) == 2 else item
                if isinstance(p, torch.Tensor):
                    if id(p) in seen:
                        name = repr(item[0]) if isinstance(item, tuple) else f"params[{i}] (shape {tuple(p.shape)})"
                        raise ValueError(
                            f"params: parameter {name} appears twice in param group {len(self.param_groups)}; "
                            "list each parameter once (torch.optim.AdamW would step a repeated parameter twice)")
                    seen.add(id(p))
            param_group = dict(param_group, params=params)
        if getattr(self, "_step_in_backward", False):
            for p in [params] if isinstance(params, torch.Tensor) else params or ():
                p = p[1] if isinstance(p, tuple) and len(p) == 2 else p
                if isinstance(p, torch.Tensor) and _dist.is_dtensor(p):
                    raise NotImplementedError(
                        f"step_in_backward: parameter {self._name(p)} is a DTensor (FSDP2); the step in backward "
                        "is not supported for sharded parameters")
        super().add_param_group(param_group)
        if getattr(self, "_hooks_armed", False):
            self._register_hooks()

    # ------------------------------------------------------------------------------------------
    # names (for errors and scores)
    # ------------------------------------------------------------------------------------------
    def _known_names(self, model: nn.Module | None) -> dict[nn.Parameter, str]:
        names = dict(self._names)
        for g in self.param_groups:
            for n, p in zip(g.get("param_names", ()), g["params"]):
                names[p] = n
        if model is not None:
            for n, p in model.named_parameters():
                names.setdefault(p, n)
        return names

    def _name(self, p: torch.Tensor, names: Mapping[nn.Parameter, str] | None = None) -> str:
        names = self._names if names is None else names
        if p in names:
            return repr(names[p])
        for gi, g in enumerate(self.param_groups):
            for i, q in enumerate(g["params"]):
                if q is p:
                    return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"
        return f"a tensor of shape {tuple(p.shape)}"

    # ------------------------------------------------------------------------------------------
    # masks and compact state
    # ------------------------------------------------------------------------------------------
    def _check_masks(self, masks: Mapping[nn.Parameter, torch.Tensor], names, what: str = "masks"
                     ) -> dict[nn.Parameter, torch.Tensor]:
        """Validated ``{param: int32 indices on its device}``; writes nothing."""
        owned = {p for g in self.param_groups for p in g["params"]}
        checked: dict[nn.Parameter, torch.Tensor] = {}
        for p, idx in masks.items():
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{what}: keys must be parameters (tensors), got {type(p).__name__}; "
                                "for a MaskSet pass model=")
            if p not in owned:
                raise ValueError(f"{what}: a mask is given for {self._name(p, names)}, which is not among this "
                                 "optimizer's parameters")
            if p.layout != torch.strided:
                raise TypeError(f"{what}: parameter {self._name(p, names)} has layout {p.layout}; only strided "
                                "(dense) parameters can be masked")
            if not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"{what}: parameter {self._name(p, names)} has dtype {p.dtype}; masked parameters "
                                "must have a floating or complex dtype")
            if p.is_complex() and self.track_scores:
                raise TypeError(f"{what}: parameter {self._name(p, names)} is complex; track_scores supports "
                                "real parameters only")
            _dist.row_shards(p, f"{what}: parameter {self._name(p, names)}")  # a placement it can step, or raise
            check_indices(idx, p.numel(), f"{what}[{self._name(p, names)}]")
            checked[p] = idx.to(device=p.device, dtype=torch.int32)
        return checked

    def _build(self, checked: Mapping[nn.Parameter, torch.Tensor]) -> list[_Bucket]:
        """Fresh compact state for the masked params (new tensors; self is not touched)."""
        buckets = []
        for gi, group in enumerate(self.param_groups):
            keyed: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
            for p in group["params"]:
                if p in checked:
                    keyed.setdefault((p.device, p.dtype), []).append(p)
            for (device, dtype), params in keyed.items():
                parts = [_local_part(p, checked[p], self._name(p)) for p in params]
                buckets.append(self._make_bucket(gi, device, dtype, params, [checked[p] for p in params], parts))
        return buckets

    def _make_bucket(self, gi: int, device: torch.device, dtype: torch.dtype, params: list[nn.Parameter],
                     idxs: list[torch.Tensor], parts: list[_Local]) -> _Bucket:
        is_complex = dtype.is_complex
        per = 2 if is_complex else 1
        mask_offsets, offsets = [0], [0]
        for i, part in zip(idxs, parts):
            mask_offsets.append(mask_offsets[-1] + i.numel())
            offsets.append(offsets[-1] + per * (part.hi - part.lo))
        idx = torch.cat(idxs) if idxs else torch.empty(0, dtype=torch.int32, device=device)
        # This rank's entries, as flat indices into its local tensors (the whole mask unless sharded).
        local = [i[part.lo:part.hi] - part.rows.flat_lo if part.sharded else i  # type: ignore[union-attr]
                 for i, part in zip(idxs, parts)]
        lidx = (torch.cat(local) if any(part.sharded for part in parts) else idx) if idxs else idx
        # view_as_real(p).reshape(-1)[2i + c] is the real (c=0) or imaginary (c=1) part of entry i.
        kidx = (torch.stack([2 * lidx, 2 * lidx + 1], dim=1).reshape(-1) if is_complex else lidx)
        k = offsets[-1]
        sdt = ops.state_dtype(_real_dtype(dtype))
        amsgrad = self.param_groups[gi]["amsgrad"]
        return _Bucket(
            group=gi, params=params, offsets=offsets, mask_offsets=mask_offsets, idx=idx, kidx=kidx,
            exp_avg=torch.zeros(k, dtype=sdt, device=device),
            exp_avg_sq=torch.zeros(k, dtype=sdt, device=device),
            max_exp_avg_sq=torch.zeros(k, dtype=sdt, device=device) if amsgrad else None,
            steps=torch.zeros(len(params), dtype=torch.float32, device=device),
            scores=[torch.zeros(_local(p).shape, dtype=torch.float32, device=device) for p in params]
            if self.track_scores else None,
            is_complex=is_complex,
            parts=parts if any(part.rows is not None for part in parts) else None,
        )

    @staticmethod
    def _bucket_states(b: _Bucket) -> dict[nn.Parameter, dict[str, torch.Tensor]]:
        """``optimizer.state`` entries of a bucket's params: views of its buffers (all tensors)."""
        out = {}
        for t, p in enumerate(b.params):
            lo, hi = b.offsets[t], b.offsets[t + 1]
            state = {
                "step": b.steps[t],
                "exp_avg": b.exp_avg[lo:hi],
                "exp_avg_sq": b.exp_avg_sq[lo:hi],
                "mask_indices": b.idx[b.mask_offsets[t] : b.mask_offsets[t + 1]],
                "param_shape": torch.tensor(p.shape, dtype=torch.int64),
            }
            if b.max_exp_avg_sq is not None:
                state["max_exp_avg_sq"] = b.max_exp_avg_sq[lo:hi]
            if b.scores is not None:
                state["scores"] = b.scores[t]
            out[p] = state
        return out

    def _install(self, buckets: list[_Bucket], names: dict[nn.Parameter, str]) -> None:
        """Make ``buckets`` the compact state (the commit point of set_masks / load_state_dict)."""
        for p in self._mask_of:
            self.state.pop(p, None)  # old compact state: gone, whatever becomes of the param
        self._names = names
        self._buckets = buckets
        self._bucket_of = {p: b for b in buckets for p in b.params}
        self._mask_of = {}
        for b in buckets:
            for p, state in self._bucket_states(b).items():
                self.state[p] = state  # replaces dense state of a param that becomes masked
                self._mask_of[p] = state["mask_indices"]
        self._mask_version += 1

    # ------------------------------------------------------------------------------------------
    # distributed: every rank holds the same masks
    # ------------------------------------------------------------------------------------------
    def _mask_group(self) -> Any:
        """The group whose ranks must agree on masks, or None (no check: off, or nobody to ask)."""
        return _dist.resolve_group(self._process_group) if self._verify_masks else None

    def _verify(self, group: Any, masks: Mapping[nn.Parameter, torch.Tensor] | None, names, what: str) -> None:
        """Collective: every rank's masks (``None``: this rank failed) must agree."""
        if masks is None:
            _dist.verify_same_masks(None, group, what=what, failed=True)
            return
        entries = [(self._name(p, names), tuple(p.shape), masks.get(p))
                   for g in self.param_groups for p in g["params"]]
        _dist.verify_same_masks(entries, group, what=what)

    @property
    def mask_version(self) -> int:
        """Increases whenever the masks change (:meth:`set_masks`, masks adopted by
        :meth:`load_state_dict`); :class:`fastmask.distributed.MaskedAllreduceState` follows it."""
        return self._mask_version

    def set_masks(
        self,
        masks: MaskSet | Mapping[nn.Parameter, torch.Tensor],
        *,
        model: nn.Module | None = None,
    ) -> None:
        """Use new masks (e.g. for the next task): re-creates the compact state of masked params.

        Masked parameters start from fresh state (step 0), as the original work re-creates its
        optimizer per task. A parameter that loses its mask becomes dense with fresh state; dense
        parameters that stay dense keep theirs. Tracked scores restart from zero. Everything is
        checked before anything changes.

        Under an initialized process group this is a collective call (see ``verify_masks``):
        every rank must call it, with the same masks.
        """
        self._set_masks(masks, model, "set_masks")

    def _set_masks(self, masks, model: nn.Module | None, what: str) -> None:
        group = self._mask_group()
        try:
            names = self._known_names(model)
            if isinstance(masks, MaskSet):
                if model is None:
                    raise ValueError("masks: a MaskSet needs model= to map its names to parameters")
                masks = masks.for_model(model)
            checked = self._check_masks(masks, names)
            buckets = self._build(checked)
        except BaseException:
            if group is not None:
                self._verify(group, None, None, what)  # take part, so the other ranks do not hang
            raise
        if group is not None:
            self._verify(group, checked, names, what)
        self._install(buckets, names)

    @property
    def masks(self) -> dict[nn.Parameter, torch.Tensor]:
        """``{Parameter: int32 indices}`` of the masked parameters (views of the compact state)."""
        return dict(self._mask_of)

    def scores(self) -> dict[str, torch.Tensor]:
        """Scores tracked since :meth:`set_masks` (``track_scores``), by parameter name.

        For ``"grad"`` the magnitude of the signed sum is returned, as :func:`fastmask.score` does.
        Feed the result to :func:`fastmask.select` to pick the next task's masks. For a DTensor
        parameter (FSDP2) the score is a DTensor placed like the parameter (its gradients were
        already reduced across ranks): ``.full_tensor()`` gathers it for ``select``.
        """
        if not self.track_scores:
            raise RuntimeError("scores: construct the optimizer with track_scores='grad'|'abs'|'fisher'")
        out = {}
        for b in self._buckets:
            for p, s in zip(b.params, b.scores):  # type: ignore[arg-type]
                if p not in self._names:
                    raise RuntimeError(
                        "scores: parameter names are unknown; pass model= (or named parameters) to the optimizer"
                    )
                s = s.abs() if self.track_scores == "grad" else s.clone()
                out[self._names[p]] = self._like_param(s, p)
        return out

    @staticmethod
    def _like_param(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``local`` (the shape of this rank's part of ``p``) as a DTensor placed like ``p``."""
        if not _dist.is_dtensor(p):
            return local
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=torch.empty(p.shape, device="meta").stride())

    # ------------------------------------------------------------------------------------------
    # pickling / deepcopy: the compact buffers travel, the state views are rebuilt from them
    # ------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["state"] = {p: s for p, s in self.state.items() if p not in self._mask_of}
        # The process group is not picklable: a copy checks its masks against the default group.
        state["_fastmask"] = {"buckets": self._buckets, "names": self._names, "track_scores": self.track_scores,
                              "verify_masks": self._verify_masks, "step_in_backward": self._step_in_backward}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from collections import defaultdict

        extra = state.pop("_fastmask", None) or {"buckets": [], "names": {}, "track_scores": None}
        super().__setstate__(state)
        self.state = defaultdict(dict, self.state)
        self.track_scores = extra["track_scores"]
        self._process_group = None
        self._verify_masks = extra.get("verify_masks", True)
        self._mask_version = 0
        self._step_supports_amp_scaling = True
        self._mask_of = {}
        self._install(extra["buckets"], dict(extra["names"]))
        self._step_in_backward = extra.get("step_in_backward", False)
        self._accumulating = 0
        self._hooks = {}
        self._reset_backward_window()
        if self._step_in_backward:
            self._register_hooks()  # on this copy's parameters

    # ------------------------------------------------------------------------------------------
    # step: plan and check everything, then write
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; returns the closure's loss if a closure is given.

        All groups, buckets and dense parameters are checked before the first write, so a step
        that raises changes nothing.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check = getattr(self, "_accelerator_graph_capture_health_check", None) or self._cuda_graph_capture_health_check
        check()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if self._step_in_backward and torch._C._current_graph_task_id() == -1:
            self._reset_backward_window()  # outside any backward pass: nothing can be open
        if self._step_in_backward and (grad_scale is not None or found_inf is not None):
            raise RuntimeError(
                "step_in_backward: torch.amp.GradScaler cannot work with the step in the backward pass: the "
                "parameters were stepped inside backward(), with scaled gradients, before any inf check. "
                "Train in bf16 autocast (no scaler needed) or use step_in_backward=False")
        actions: list[Callable[[], None]] = []
        for gi, group in enumerate(self.param_groups):
            self._check_group(gi, group)
        for b in self._buckets:
            actions += self._plan_bucket(b, self.param_groups[b.group], grad_scale, found_inf)
        for group in self.param_groups:
            actions += self._plan_dense(group, grad_scale, found_inf)
        for act in actions:
            act()
        return loss

    # ------------------------------------------------------------------------------------------
    # the step in the backward pass
    # ------------------------------------------------------------------------------------------
    @property
    def step_in_backward(self) -> bool:
        """Whether parameters are stepped inside ``backward()`` (see the class docstring)."""
        return self._step_in_backward

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        """Inside this context, backward passes only accumulate gradients (for micro-batches); the
        step in the backward pass resumes when it exits. Nests; a no-op without
        ``step_in_backward``."""
        self._accumulating += 1
        try:
            yield
        finally:
            self._accumulating -= 1

    def _register_hooks(self) -> None:
        """A post-accumulate-grad hook on every trainable parameter not hooked yet. The hooks hold the
        optimizer weakly: a dropped optimizer stops stepping (and removes them when collected)."""
        ref = weakref.ref(self)
        self._hooks_armed = True
        self._group_of = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        for group in self.param_groups:
            for p in group["params"]:
                if p not in self._hooks and p.requires_grad:
                    self._hooks[p] = p.register_post_accumulate_grad_hook(functools.partial(_backward_hook, ref))

    def _remove_hooks(self) -> None:
        for handle in getattr(self, "_hooks", {}).values():
            handle.remove()
        self._hooks = {}

    def __del__(self) -> None:
        self._remove_hooks()

    def _reset_backward_window(self) -> None:
        self._live_tasks: set[int] = set()
        self._stepped_in_window: set[torch.Tensor] = set()

    def _once_per_backward(self, p: torch.Tensor) -> None:
        """Refuse a second gradient for ``p`` within one backward pass.

        A reentrant checkpoint (``use_reentrant=True``) runs a nested backward pass for its segment,
        which accumulates into ``p.grad`` on its own: a parameter used inside such a segment and
        outside it (or in two segments) would be stepped once per part of its gradient. The window
        of one backward pass lasts while any graph task that stepped a parameter is still running
        (an end-of-task callback closes it), so such a second gradient is caught."""
        task = torch._C._current_graph_task_id()
        if task not in self._live_tasks:
            self._live_tasks.add(task)
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(_backward_done, weakref.ref(self), task))
        if p in self._stepped_in_window:
            raise RuntimeError(
                f"step_in_backward: parameter {self._name(p)} received a second gradient within one backward "
                "pass, so it was stepped with part of its gradient: it is used inside a reentrant checkpointed "
                "segment (torch.utils.checkpoint with use_reentrant=True) and outside it, or in two such "
                "segments. Use non-reentrant checkpointing (use_reentrant=False, the default of Hugging Face "
                "models' gradient_checkpointing_enable) or step_in_backward=False")
        self._stepped_in_window.add(p)

    @torch.no_grad()
    def _step_one(self, p: torch.Tensor) -> None:
        """Step ``p`` alone, as :meth:`step` would, and free its gradient (called by its hook)."""
        gi = self._group_of.get(p)
        if p.grad is None or gi is None or gi >= len(self.param_groups) or not any(
                q is p for q in self.param_groups[gi]["params"]):
            return  # no longer this optimizer's (a param group was edited by hand): leave the gradient
        group = self.param_groups[gi]
        check = getattr(self, "_accelerator_graph_capture_health_check", None) or self._cuda_graph_capture_health_check
        check()
        self._check_group(gi, group, [p])
        if p in self._mask_of:
            actions = self._plan_bucket(self._bucket_of[p], group, None, None, only=p)
        else:
            actions = self._plan_dense(group, None, None, only=p)
        for act in actions:
            act()
        p.grad = None

    def _check_group(self, gi: int, group: dict, only: list[torch.Tensor] | None = None) -> None:
        """The group's hyper-parameters, and the gradients of its params (of ``only``, if given)."""
        where = f"param_groups[{gi}]"
        _check_scalar(f"{where}['lr']", group["lr"])
        _check_scalar(f"{where}['eps']", group["eps"])
        _check_scalar(f"{where}['weight_decay']", group["weight_decay"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{where}['betas']: expected a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            _check_scalar(f"{where}['betas'][{i}]", b, upper=1.0)
        if group.get("differentiable"):
            raise NotImplementedError(f"{where}['differentiable']: differentiable=True is not supported")
        if group["fused"] and group["foreach"]:
            raise RuntimeError(f"{where}: `fused` and `foreach` cannot be `True` together")
        params = group["params"] if only is None else only
        dense = [p for p in params if p.grad is not None and p not in self._mask_of]
        if dense and group["foreach"] and not group["capturable"]:
            # torch's foreach AdamW refuses these; refuse them before anything is written
            if isinstance(group["lr"], torch.Tensor):
                raise ValueError(f"{where}['lr']: lr as a Tensor is not supported for capturable=False and foreach=True")
            if isinstance(betas[0], torch.Tensor):
                raise ValueError(f"{where}['betas']: betas as Tensors are not supported for capturable=False and "
                                 "foreach=True")
        if dense and group["capturable"]:
            from torch.optim.optimizer import _get_capturable_supported_devices

            ok = _get_capturable_supported_devices()
            for p in dense:
                if p.device.type not in ok:
                    raise RuntimeError(f"{where}['capturable']: capturable=True needs parameters on one of {ok}; "
                                       f"{self._name(p)} is on {p.device}")
        for p in params:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"MaskedAdamW does not support sparse gradients ({self._name(p)}); "
                                   "consider torch.optim.SparseAdam")
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                raise ValueError(f"grad of {self._name(p)}: expected {p.dtype} {tuple(p.shape)} on {p.device} like "
                                 f"the parameter, got {g.dtype} {tuple(g.shape)} on {g.device}")
            if _dist.is_dtensor(p) or _dist.is_dtensor(g):
                self._check_dtensor_grad(p, g)

    def _check_dtensor_grad(self, p: torch.Tensor, g: torch.Tensor) -> None:
        """A DTensor parameter's gradient is a DTensor placed like it (FSDP2 reduce-scatters it so)."""
        if not (_dist.is_dtensor(p) and _dist.is_dtensor(g)):
            kind = lambda t: "a DTensor" if _dist.is_dtensor(t) else "a plain tensor"  # noqa: E731
            raise ValueError(f"grad of {self._name(p)}: the parameter is {kind(p)} but its gradient is {kind(g)}")
        if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
            raise ValueError(f"grad of {self._name(p)}: placed as {tuple(g.placements)} on {g.device_mesh}, but the "
                             f"parameter is placed as {tuple(p.placements)} on {p.device_mesh}")
        if p in self._mask_of and g.to_local().shape != p.to_local().shape:
            raise ValueError(f"grad of {self._name(p)}: this rank holds {tuple(g.to_local().shape)} of the gradient "
                             f"but {tuple(p.to_local().shape)} of the parameter")

    def _plan_bucket(self, b: _Bucket, group: dict, grad_scale, found_inf, only: torch.Tensor | None = None
                     ) -> list[Callable[[], None]]:
        active = [p.grad is not None and (only is None or p is only) for p in b.params]
        if not any(active):
            return []
        device = b.steps.device
        lr = group["lr"]
        lr_t = lr if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=torch.float64)
        beta1, beta2 = (float(x) for x in group["betas"])
        weight_decay = group["weight_decay"]
        grad_scale, found_inf = self._on(grad_scale, device), self._on(found_inf, device)
        if group["amsgrad"] and b.max_exp_avg_sq is None:
            raise RuntimeError("amsgrad was switched on after set_masks(); call set_masks() again to create its state")
        decay_all = group["decay_unselected"] and weight_decay != 0
        actions = []
        for a, e in _runs(active):
            whole = a == 0 and e == len(b.params)
            lo, hi = b.offsets[a], b.offsets[e]

            def part(t, lo=lo, hi=hi, whole=whole):
                return t if (whole or t is None) else t[lo:hi]

            params = b.params[a:e]
            tensors = [_local(p) for p in params]  # this rank's rows of an FSDP2 parameter
            call = dict(
                params=[_real(t) for t in tensors], grads=[_real(_local(p.grad)) for p in params], idx=part(b.kidx),
                exp_avg=part(b.exp_avg), exp_avg_sq=part(b.exp_avg_sq), offsets=[o - lo for o in b.offsets[a : e + 1]],
                steps=b.steps if whole else b.steps[a:e], lr=lr_t, beta1=beta1, beta2=beta2, eps=group["eps"],
                # The original code's dense AdamW decays every entry: the whole tensor is decayed
                # before the op (in the param's dtype, as torch does) and the op skips decay.
                weight_decay=0.0 if decay_all else weight_decay, maximize=group["maximize"],
                max_exp_avg_sq=part(b.max_exp_avg_sq), grad_scale=grad_scale, found_inf=found_inf,
                scores=b.scores[a:e] if b.scores is not None else None, score_mode=self.track_scores or "grad",
            )
            try:
                ops.check_masked_adamw_step_(**call)
            except (ValueError, TypeError, IndexError) as exc:
                names = ", ".join(self._name(p) for p in params)
                raise type(exc)(f"{exc} (masked parameters {names})") from exc

            def run(call=call, tensors=tensors):
                call["steps"].add_(1)
                if decay_all:
                    torch._foreach_mul_(tensors, self._decay_factor(group, device, found_inf))
                ops.masked_adamw_step_(**call)
                if found_inf is not None:
                    call["steps"].sub_(found_inf.reshape(()))

            actions.append(run)
        return actions

    @staticmethod
    def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        return None if t is None else t.to(device, non_blocking=True)

    @staticmethod
    def _decay_factor(group: dict, device: torch.device, found_inf):
        lr, weight_decay = group["lr"], group["weight_decay"]
        if found_inf is None and not isinstance(lr, torch.Tensor):
            return 1 - lr * weight_decay
        factor = 1 - torch.as_tensor(lr, dtype=torch.float64).to(device) * weight_decay
        if found_inf is not None:
            factor = torch.where(found_inf.reshape(()) != 0, torch.ones((), device=device, dtype=factor.dtype), factor)
        return factor

    # ------------------------------------------------------------------------------------------
    # dense parameters: torch's own AdamW functional, with the group's flags
    # ------------------------------------------------------------------------------------------
    def _fusable(self, p: torch.Tensor, state: dict) -> bool:
        """PyTorch's fused AdamW walks memory linearly: correct only for params, grads and state of
        one gap-free layout (the layout is checked on existing state, which zeros_like creates in
        the param's layout)."""
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        if not p.is_floating_point() or p.device.type not in _get_fused_kernels_supported_devices():
            return False
        if not _is_dense_layout(p) or p.grad.stride() != p.stride():
            return False
        return all(state[k].stride() == p.stride() for k in _MASKED_KEYS if k in state)

    def _plan_dense(self, group: dict, grad_scale, found_inf, only: torch.Tensor | None = None
                    ) -> list[Callable[[], None]]:
        candidates = group["params"] if only is None else [only]
        params = [p for p in candidates if p.grad is not None and p not in self._mask_of]
        if not params:
            return []
        if group["fused"]:
            from torch.optim.optimizer import _device_dtype_check_for_fused

            for p in params:
                try:
                    _device_dtype_check_for_fused(p, cuda_unsupported=False)
                except RuntimeError as exc:
                    raise RuntimeError(f"fused: {exc} ({self._name(p)})") from exc
        for p in params:
            for key in ("exp_avg", "exp_avg_sq"):
                st = self.state[p].get(key) if p in self.state else None
                if st is not None and st.shape != p.shape:
                    raise ValueError(f"state {key!r} of {self._name(p)} has shape {tuple(st.shape)}, expected "
                                     f"{tuple(p.shape)}")
        return [lambda: self._step_dense(group, params, grad_scale, found_inf)]

    def _init_missing_dense_state(self) -> None:
        """While there are masks, give every trainable dense parameter without state its fresh
        state now (zeros, step 0: what its first step would create; see the class docstring)."""
        if not self._mask_of:
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and p not in self._mask_of and not self.state.get(p):
                    self._init_dense_state(group, p)

    def _init_dense_state(self, group: dict, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state.update(self._fresh_dense_state(group, p))
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @staticmethod
    def _fresh_dense_state(group: dict, p: torch.Tensor) -> dict:
        from torch.optim.optimizer import _get_scalar_dtype

        # As torch.optim.Adam: the step lives on the CPU unless capturable or fused.
        state = {
            "step": torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device)
            if group["capturable"] or group["fused"] else torch.tensor(0.0, dtype=_get_scalar_dtype()),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _step_dense(self, group: dict, params: list[torch.Tensor], grad_scale, found_inf) -> None:
        states = [self._init_dense_state(group, p) for p in params]
        if group["fused"]:
            fused = [(p, s) for p, s in zip(params, states) if self._fusable(p, s)]
            rest = [(p, s) for p, s in zip(params, states) if not self._fusable(p, s)]
            if fused:
                self._adam(group, fused, fused=True, foreach=False, grad_scale=grad_scale, found_inf=found_inf)
            if rest:  # torch's non-fused default for what the fused kernel would get wrong
                self._unscaled(group, rest, None, None, grad_scale, found_inf)
        else:
            self._unscaled(group, list(zip(params, states)), group["foreach"], False, grad_scale, found_inf)

    def _unscaled(self, group, pairs, foreach, fused, grad_scale, found_inf) -> None:
        """The non-fused kernels take no grad_scale/found_inf: under GradScaler, skip or unscale here
        (a host sync, as GradScaler itself makes for optimizers without fused support)."""
        if found_inf is not None:
            if bool(found_inf.item()):
                return
            if grad_scale is not None:
                grads = [p.grad for p, _ in pairs]
                torch._foreach_div_(grads, grad_scale.reshape(()).to(grads[0].device))
        self._adam(group, pairs, fused=fused, foreach=foreach, grad_scale=None, found_inf=None)

    @staticmethod
    def _adam(group, pairs, *, fused, foreach, grad_scale, found_inf) -> None:
        from torch.optim.adam import adam

        params = [p for p, _ in pairs]
        beta1, beta2 = group["betas"]
        adam(
            params, [p.grad for p in params], [s["exp_avg"] for _, s in pairs], [s["exp_avg_sq"] for _, s in pairs],
            [s["max_exp_avg_sq"] for _, s in pairs] if group["amsgrad"] else [], [s["step"] for _, s in pairs],
            foreach=foreach, capturable=group["capturable"], differentiable=False, fused=fused,
            grad_scale=grad_scale, found_inf=found_inf, has_complex=any(torch.is_complex(p) for p in params),
            decoupled_weight_decay=True, amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
        )

    # ------------------------------------------------------------------------------------------
    # state_dict
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict()``; every state entry is a tensor.

        A masked parameter's entry holds ``step``, ``exp_avg`` and ``exp_avg_sq`` (and
        ``max_exp_avg_sq``, ``scores`` when used), ``mask_indices`` (the whole mask: flat indices
        into the whole parameter) and ``param_shape``. The compact arrays hold one entry per
        selected entry in the mask's order (two, real and imaginary, for a complex parameter).

        While the optimizer has masks, a trainable dense parameter without state (after
        ``set_masks`` or ``add_param_group``, before its first step) first gets the fresh state its
        first step would create (see the class docstring), so the state dict lists every
        trainable parameter.

        **FSDP2** (masked DTensor parameters sharded by rows): each rank's compact arrays hold the
        selected entries inside its own rows, so their lengths differ per rank and match no
        layout DTensor or DCP can describe (DTensor shards a length in ``torch.chunk``'s way).
        ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` are therefore returned as DTensors of the
        *whole* compact array (the length of the mask, exactly what one process would save),
        sharded ``Shard(0)`` in DTensor's own layout over the parameter's mesh: one
        ``all_to_all_single`` per array moves the entries between the two splits. ``scores`` is a
        DTensor placed like the parameter; ``mask_indices``, ``param_shape`` and ``step`` are
        plain tensors, equal on every rank. ``dcp.save`` then writes each compact entry once,
        ``get_optimizer_state_dict(..., full_state_dict=True)`` gathers exactly the
        single-process state dict, and a checkpoint loads into any number of ranks (or one
        process). With such parameters this method is a **collective** call over their mesh:
        every rank must call it, as every rank calls ``get_optimizer_state_dict``.
        """
        self._init_missing_dense_state()
        entries = {b.params[t]: self._sharded_entry(b, t)  # collective
                   for b in self._buckets for t in range(len(b.params)) if b.part(t).sharded}
        if not entries:
            return super().state_dict()
        kept = {p: self.state[p] for p in entries}
        try:
            self.state.update(entries)  # what super() packs (and its hooks see)
            return super().state_dict()
        finally:
            self.state.update(kept)

    def _sharded_entry(self, b: _Bucket, t: int) -> dict[str, Any]:
        """The state-dict entry of a masked parameter sharded by rows (see :meth:`state_dict`)."""
        from torch.distributed.tensor import DTensor, Shard

        p, part = b.params[t], b.part(t)
        per = 2 if b.is_complex else 1
        n = per * (b.mask_offsets[t + 1] - b.mask_offsets[t])
        have = [per * x for x in part.bounds]
        want = _dist.chunk_bounds(n, part.rows.world)  # type: ignore[union-attr]
        entry = dict(self.state[p])
        for key in _MASKED_KEYS:
            if key in entry:
                mine = _dist.exchange(entry[key], have, want, p.device_mesh)
                entry[key] = DTensor.from_local(mine, p.device_mesh, [Shard(0)], run_check=False, shape=(n,),
                                                stride=(1,))
        if "scores" in entry:
            entry["scores"] = self._like_param(entry["scores"], p)
        return entry

    def _shard_meshes(self) -> list[Any]:
        """The meshes over which :meth:`load_state_dict` must act together: those of the masked
        parameters sharded by rows or, while nothing is masked (masks may be adopted), of every
        parameter sharded by rows."""
        if self._mask_of:
            params = [b.params[t] for b in self._buckets for t in range(len(b.params)) if b.part(t).sharded]
        else:
            params = []
            for g in self.param_groups:
                for p in g["params"]:
                    try:
                        rows = _dist.row_shards(p)
                    except NotImplementedError:
                        continue  # cannot be masked: nothing to adopt for it
                    if rows is not None and rows.world > 1:
                        params.append(p)
        meshes: list[Any] = []
        for p in params:
            if p.device_mesh not in meshes:
                meshes.append(p.device_mesh)
        return meshes

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()``; checks everything before changing anything.

        Masked state is copied into the compact buffers. An optimizer built with masks needs a
        state saved with the same masks (other masks, shapes or a mask where it is dense are
        refused); an optimizer built *without* masks adopts the saved ones, so a masked run
        resumes from its checkpoint alone (e.g. an HF Trainer checkpoint).
        Parameter names saved in the state dict are kept, as ``torch.optim.Optimizer`` does.

        Under an initialized process group, loading into an optimizer without masks (the only case
        that can adopt masks) is a collective call that checks every rank ends with the same masks
        (see ``verify_masks``); an optimizer with masks keeps them and loads locally.

        **FSDP2**: masked parameters sharded by rows take their compact state from either form of
        an entry: the sharded one :meth:`state_dict` makes (DTensors of the whole compact arrays
        in DTensor's layout, e.g. through ``dcp.load`` and ``set_optimizer_state_dict``; one
        ``all_to_all_single`` per array), or a whole one (plain tensors: a single-process
        checkpoint, a ``full_state_dict=True`` one; each rank keeps its part, without
        communication). Dense DTensor parameters take DTensor state as it is and whole plain
        tensors sliced to their shard. An optimizer with such parameters (or without masks, while
        it has parameters sharded by rows) loads collectively over their mesh: one small
        ``all_gather_object`` first makes every rank raise if any rank refuses its state dict, or
        if the ranks' state dicts need different exchanges.
        """
        vgroup = None if self._mask_of else self._mask_group()
        meshes = self._shard_meshes()
        done: set[str] = set()

        def agree(entries: list[tuple] | None) -> None:
            done.add("agree")  # a refusal raised by the check itself must not call it again
            for mesh in meshes:
                _dist._agree_on(
                    entries, mesh.get_group(), what="load_state_dict", item="exchanged state entry",
                    describe=lambda e: f"{e[1]!r} of {e[2]} entries", failed=entries is None,
                    hint="Every rank must load the same kind of state dict (each rank its part of a sharded one, "
                    "or the same whole one)")

        def verify(masks, names) -> None:
            done.add("verify")
            if vgroup is not None:
                self._verify(vgroup, masks, names, "load_state_dict")

        try:
            self._load_state_dict(state_dict, agree, verify)
        except BaseException:
            if meshes and "agree" not in done:
                agree(None)  # take part, so the others do not hang
            if vgroup is not None and "verify" not in done:
                self._verify(vgroup, None, None, "load_state_dict")
            raise

    @staticmethod
    def _whole(value: Any, what: str) -> Any:
        """A loaded value that must be whole on this rank: a plain tensor, or a replicated DTensor."""
        if _dist.is_dtensor(value):
            if not all(pl.is_replicate() for pl in value.placements):
                raise ValueError(f"{what} is a DTensor placed as {tuple(value.placements)}; expected a whole tensor "
                                 "here (load a full state dict, e.g. full_state_dict=True)")
            return value.to_local()
        return value

    def _masked_source(self, p: torch.Tensor, part: _Local, per: int, key: str, value: Any, name: str
                       ) -> tuple[str, Any]:
        """Where this rank's part of a loaded masked state entry comes from: ``("copy", tensor)``
        (no communication) or ``("exchange", (local, have, want, mesh))``. Raises if unusable."""
        what = f"loaded state {key!r} for {name}"
        if key == "scores":
            if not part.sharded:
                return "copy", self._whole(value, what)
            rows = part.rows
            if _dist.is_dtensor(value):
                local = value.to_local()
                if (value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements)
                        or local.shape != _local(p).shape):
                    raise ValueError(f"{what} is a DTensor placed as {tuple(value.placements)} with local shape "
                                     f"{tuple(local.shape)}; expected it placed like the parameter")
                return "copy", local
            r0, r1 = rows.row_bounds[rows.coord], rows.row_bounds[rows.coord + 1]  # type: ignore[union-attr]
            return "copy", value[r0:r1]
        if not part.sharded:
            return "copy", self._whole(value, what)
        rows = part.rows
        coord, world = rows.coord, rows.world  # type: ignore[union-attr]
        n = value.numel()
        have = [per * x for x in part.bounds]  # this rank's natural part of the compact array
        if not _dist.is_dtensor(value):
            return "copy", value[have[coord]: have[coord + 1]]
        if all(pl.is_replicate() for pl in value.placements):
            return "copy", value.to_local()[have[coord]: have[coord + 1]]
        from torch.distributed.tensor import Shard

        want = _dist.chunk_bounds(n, world)
        local = value.to_local()
        if (value.device_mesh != p.device_mesh or tuple(value.placements) != (Shard(0),)
                or local.shape != (want[coord + 1] - want[coord],)):
            raise ValueError(f"{what} is a DTensor placed as {tuple(value.placements)} on {value.device_mesh} with "
                             f"{local.numel()} entries here; expected Shard(0) over the parameter's mesh in DTensor's "
                             f"layout ({want[coord + 1] - want[coord]} entries here), or a whole tensor")
        return "exchange", (local, want, have, p.device_mesh)

    def _load_state_dict(self, state_dict: dict[str, Any], agree: Callable[..., None],
                         verify: Callable[..., None]) -> None:
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has {len(groups)}")
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"param group {gi}: loaded state dict has {len(sg['params'])} parameters, this optimizer has {len(g['params'])}"
                )
        id_map = {sid: p for g, sg in zip(groups, saved_groups) for sid, p in zip(sg["params"], g["params"])}
        saved_state = state_dict["state"]
        names = self._known_names(None)
        for g, sg in zip(groups, saved_groups):
            for n, p in zip(sg.get("param_names", ()), g["params"]):
                names.setdefault(p, n)

        # 1. Check everything; find the masks to adopt.
        adopted: dict[nn.Parameter, torch.Tensor] = {}
        for sid, p in id_map.items():
            st = saved_state.get(sid)
            name = self._name(p, names)
            if st is not None and not isinstance(st, Mapping):
                raise TypeError(f"loaded state for {name}: expected a dict, got {type(st).__name__}")
            if st is not None and "param_shape" in st:
                shape = tuple(int(x) for x in torch.as_tensor(st["param_shape"]).reshape(-1).tolist())
                if shape != tuple(p.shape):
                    raise ValueError(f"loaded state for {name} was made for shape {shape}, "
                                     f"but the parameter has shape {tuple(p.shape)}")
            if p in self._mask_of:
                if st is None or "mask_indices" not in st:
                    raise ValueError(f"loaded state has no mask for {name}, which this optimizer masks")
                saved_idx = torch.as_tensor(self._whole(st["mask_indices"], f"loaded state 'mask_indices' for {name}"))
                mine = self._mask_of[p]
                if saved_idx.numel() != mine.numel() or not torch.equal(saved_idx.to(mine.device, torch.int32), mine):
                    raise ValueError(
                        f"loaded state for {name} was made with different masks ({saved_idx.numel()} "
                        f"selected entries saved, {mine.numel()} here, or other positions)"
                    )
                self._check_masked_entry(p, st, mine.numel(), name, self.state[p])
            elif st is not None and "mask_indices" in st and self._mask_of:
                raise ValueError(f"loaded state has a mask for {name}, which this optimizer updates densely "
                                 "(an optimizer built without any masks adopts the saved ones)")
            elif st is not None and "mask_indices" in st:
                saved_idx = self._whole(st["mask_indices"], f"loaded state 'mask_indices' for {name}")
                idx = self._check_masks({p: torch.as_tensor(saved_idx)}, names, what="loaded state mask_indices")[p]
                adopted[p] = idx
                self._check_masked_entry(p, st, idx.numel(), name, None)
            elif st is not None:
                for key in _MASKED_KEYS:
                    if key not in st:
                        continue
                    if not isinstance(st[key], torch.Tensor):
                        raise TypeError(f"loaded state {key!r} for {name} must be a tensor, got "
                                        f"{type(st[key]).__name__}")
                    if tuple(st[key].shape) != tuple(p.shape):
                        raise ValueError(f"loaded state {key!r} for {name} has shape {tuple(st[key].shape)}, "
                                         f"expected {tuple(p.shape)}")
                    if _dist.is_dtensor(st[key]) and not (
                            _dist.is_dtensor(p) and st[key].device_mesh == p.device_mesh
                            and tuple(st[key].placements) == tuple(p.placements)):
                        where = (f"placed as {tuple(p.placements)}" if _dist.is_dtensor(p) else "a plain tensor")
                        raise ValueError(f"loaded state {key!r} for {name} is a DTensor placed as "
                                         f"{tuple(st[key].placements)}, but the parameter is {where}")
                if "step" in st:
                    self._check_step_value(st["step"], name)

        # 2. Build what changes (new tensors only): the adopted masks' buckets, and where each
        # masked state entry's part on this rank comes from (a plain copy, or an exchange).
        buckets = None
        masks = dict(self._mask_of)
        if adopted:
            masks = {**masks, **adopted}
            buckets = self._build(masks)
        layout, states = {}, {}
        for b in buckets if buckets is not None else self._buckets:
            layout.update({p: (b, t) for t, p in enumerate(b.params)})
            states.update(self._bucket_states(b) if buckets is not None else {p: self.state[p] for p in b.params})
        sources: dict[tuple[nn.Parameter, str], tuple[str, Any]] = {}
        for sid, p in id_map.items():
            if p not in masks:
                continue
            st = saved_state[sid]
            b, t = layout[p]
            for key in (*_MASKED_KEYS, "scores"):
                if key in st and key in states[p]:  # what the commit below copies
                    sources[(p, key)] = self._masked_source(p, b.part(t), 2 if b.is_complex else 1, key, st[key],
                                                            self._name(p, names))
        # 3. Every rank has passed its checks (and needs the same exchanges), the masks agree.
        agree([(self._name(p, names), key, int(saved_state[sid][key].numel()))
               for sid, p in id_map.items() for key in (*_MASKED_KEYS, "scores")
               if sources.get((p, key), ("",))[0] == "exchange"])
        verify(masks, names)
        # 4. Exchanges (collective, in the same order on every rank), then commit.
        parts = {pk: (_dist.exchange(*src) if kind == "exchange" else src) for pk, (kind, src) in sources.items()}
        if buckets is not None:
            self._install(buckets, names)
        else:
            self._names = names
        group_of = {p: g for g in groups for p in g["params"]}
        for sid, p in id_map.items():
            st = saved_state.get(sid)
            if p in self._mask_of:
                mine = self.state[p]
                for key in ("step", *_MASKED_KEYS, "scores"):
                    if key in mine and key in st:
                        mine[key].copy_(torch.as_tensor(parts[(p, key)] if (p, key) in parts else st[key]))
            elif st is not None:
                new = {}
                for key, value in st.items():
                    if key == "step":
                        sg = next(s for g, s in zip(groups, saved_groups) if g is group_of[p])
                        on_device = sg.get("fused") or sg.get("capturable")
                        new[key] = torch.as_tensor(value, dtype=torch.float32).to(
                            p.device if on_device else "cpu").clone()
                    elif isinstance(value, torch.Tensor) and _dist.is_dtensor(p) and not _dist.is_dtensor(value):
                        # a whole tensor (a single-process or full checkpoint): each rank keeps its shard
                        from torch.distributed.tensor import distribute_tensor

                        new[key] = distribute_tensor(value.to(dtype=p.dtype, device=p.device), p.device_mesh,
                                                     p.placements, src_data_rank=None).clone()
                    elif isinstance(value, torch.Tensor):
                        new[key] = value.to(dtype=p.dtype, device=p.device).clone()
                    else:
                        new[key] = value
                self.state[p] = new
            else:
                self.state.pop(p, None)
        for g, sg in zip(groups, saved_groups):
            for key, value in sg.items():
                if key != "params":
                    g[key] = value
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    @staticmethod
    def _check_step_value(step: Any, name: str) -> None:
        if isinstance(step, torch.Tensor):
            if step.numel() != 1:
                raise ValueError(f"loaded state 'step' for {name} must have one element, got shape {tuple(step.shape)}")
        elif isinstance(step, bool) or not isinstance(step, (int, float)):
            raise TypeError(f"loaded state 'step' for {name} must be a number or a one-element tensor, "
                            f"got {type(step).__name__}")

    def _check_masked_entry(self, p: torch.Tensor, st: Mapping, k: int, name: str, mine: dict | None) -> None:
        """The saved compact state of a masked param fits a mask of ``k`` entries."""
        n = k * (2 if p.is_complex() else 1)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            needed = key != "max_exp_avg_sq" or (mine is not None and key in mine)
            if key not in st:
                if needed:
                    raise ValueError(f"loaded state for {name} lacks {key!r} of {n} entries")
                continue
            if not isinstance(st[key], torch.Tensor) or st[key].numel() != n:
                raise ValueError(f"loaded state {key!r} for {name} must be a tensor of {n} entries")
        for key in _MASKED_KEYS:
            if key in st and st[key].dim() != 1:
                raise ValueError(f"loaded state {key!r} for {name} must be 1-D (compact), got shape "
                                 f"{tuple(st[key].shape)}")
        if "step" not in st:
            raise ValueError(f"loaded state for {name} lacks 'step'")
        self._check_step_value(st["step"], name)
        if "scores" in st and (mine is None or "scores" in mine) and tuple(st["scores"].shape) != tuple(p.shape):
            raise ValueError(f"loaded state 'scores' for {name} has shape {tuple(st['scores'].shape)}, "
                             f"expected {tuple(p.shape)}")

    def __repr__(self) -> str:
        k = sum(b.idx.numel() for b in self._buckets)
        return super().__repr__().replace(
            "(", f"(masked tensors: {len(self._mask_of)}, selected entries: {k}\n", 1)
