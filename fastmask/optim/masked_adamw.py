"""MaskedAdamW: AdamW whose masked parameters change only at their selected entries.

State layout. The masked parameters of one param group are bucketed by (device, dtype). A bucket
owns flat buffers laid out back to back over its tensors (the compact layout of
:mod:`fastmask.ops`): ``idx`` (int32), ``exp_avg`` and ``exp_avg_sq`` (fp32, one entry per
selected entry), one fp32 step count per tensor, and the host list of segment offsets. Each masked
parameter's ``optimizer.state[p]`` holds *views* into these buffers, so ``state_dict()`` looks
like ``torch.optim.AdamW``'s (plus ``mask_indices``), and a step over a bucket is one op call.

Parameters without a mask are updated densely by PyTorch's fused AdamW (foreach where fused is
unavailable), with the same maths.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import ops
from .._checks import check_indices
from ..masks import MaskSet

__all__ = ["MaskedAdamW"]

_SCORE_MODES = ops.SCORE_MODES
_MASKED_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass
class _Bucket:
    """Compact state of the masked params of one group that share a device and dtype."""

    group: int
    params: list[nn.Parameter]
    offsets: list[int]  # host, len(params) + 1
    idx: torch.Tensor  # int32 [K]
    exp_avg: torch.Tensor  # fp32 [K]
    exp_avg_sq: torch.Tensor  # fp32 [K]
    max_exp_avg_sq: torch.Tensor | None  # fp32 [K], amsgrad only
    steps: torch.Tensor  # fp32 [T], on the params' device
    scores: list[torch.Tensor] | None  # fp32 full shape, track_scores only


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


class MaskedAdamW(torch.optim.Optimizer):
    r"""AdamW that updates only selected entries of masked parameters, with state only for them.

    Constructed like :class:`torch.optim.AdamW`, plus:

    Args:
        masks: ``{Parameter: 1-D integer tensor of flat indices}`` (sorted, unique), or a
            :class:`~fastmask.MaskSet` together with ``model``. Masked parameters keep fp32
            ``exp_avg``/``exp_avg_sq`` for their selected entries only and change only there;
            parameters without a mask are updated densely.
        model: the model the MaskSet's names refer to; also used to name parameters in errors and
            in :meth:`scores` (named parameters given as ``params`` serve the same purpose).
        decay_unselected: if ``True`` (per group), weight decay also shrinks the unselected entries
            of masked parameters, as the original SPU code's dense AdamW did. Off by default:
            unselected entries stay bit-exact.
        track_scores: ``"grad"``, ``"abs"`` or ``"fisher"`` to accumulate, in the same pass as the
            step, every entry's gradient statistic of the masked parameters (full-shape fp32);
            :meth:`scores` returns them for :func:`fastmask.select`.

    ``lr`` may be a tensor (kept as is, so compiled steps need not recompile). Works with LR
    schedulers, closures and ``torch.amp.GradScaler`` (``scaler.step(opt)`` hands the scale and
    the inf flag to the step, which skips without a host sync). Change masks between tasks with
    :meth:`set_masks`, which re-creates the compact state.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        masks: MaskSet | Mapping[nn.Parameter, torch.Tensor] | None = None,
        model: nn.Module | None = None,
        decay_unselected: bool = False,
        track_scores: str | None = None,
    ) -> None:
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError("lr: a tensor lr must have one element")
        elif not 0.0 <= lr:
            raise ValueError(f"lr: invalid learning rate {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"eps: invalid epsilon value {eps}")
        for i, b in enumerate(betas):
            if not 0.0 <= float(b) < 1.0:
                raise ValueError(f"betas: invalid beta parameter at index {i}: {b}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay: invalid value {weight_decay}")
        if track_scores is not None and track_scores not in _SCORE_MODES:
            raise ValueError(f"track_scores: expected None or one of {_SCORE_MODES}, got {track_scores!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decay_unselected=decay_unselected)
        super().__init__(params, defaults)
        # GradScaler passes grad_scale/found_inf to step() instead of unscaling and syncing.
        self._step_supports_amp_scaling = True
        self.track_scores = track_scores
        self._buckets: list[_Bucket] = []
        self._mask_of: dict[nn.Parameter, torch.Tensor] = {}
        self._names: dict[nn.Parameter, str] = {}
        self.set_masks(masks if masks is not None else {}, model=model)

    # ------------------------------------------------------------------------------------------
    # masks and compact state
    # ------------------------------------------------------------------------------------------
    def _name(self, p: torch.Tensor) -> str:
        if p in self._names:
            return repr(self._names[p])
        for gi, g in enumerate(self.param_groups):
            for i, q in enumerate(g["params"]):
                if q is p:
                    return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"
        return f"a tensor of shape {tuple(p.shape)}"

    def _learn_names(self, model: nn.Module | None) -> None:
        for g in self.param_groups:
            for n, p in zip(g.get("param_names", ()), g["params"]):
                self._names[p] = n
        if model is not None:
            for n, p in model.named_parameters():
                self._names.setdefault(p, n)

    def set_masks(
        self,
        masks: MaskSet | Mapping[nn.Parameter, torch.Tensor],
        *,
        model: nn.Module | None = None,
    ) -> None:
        """Use new masks (e.g. for the next task): re-creates the compact state of masked params.

        Masked parameters start from fresh state (step 0), as the original work re-creates its
        optimizer per task. A parameter that loses its mask becomes dense with fresh state; dense
        parameters that stay dense keep theirs. Tracked scores restart from zero.
        """
        self._learn_names(model)
        if isinstance(masks, MaskSet):
            if model is None:
                raise ValueError("masks: a MaskSet needs model= to map its names to parameters")
            masks = masks.for_model(model)
        owned = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        checked: dict[nn.Parameter, torch.Tensor] = {}
        for p, idx in masks.items():
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"masks: keys must be parameters (tensors), got {type(p).__name__}; "
                                "for a MaskSet pass model=")
            if p not in owned:
                raise ValueError(f"masks: a mask is given for {self._name(p)}, which is not among this optimizer's parameters")
            if not p.is_contiguous():
                raise ValueError(f"masks: parameter {self._name(p)} must be contiguous to be masked")
            if p.dtype not in ops.PARAM_DTYPES:
                raise TypeError(f"masks: parameter {self._name(p)} has dtype {p.dtype}; masked params must be one of {ops.PARAM_DTYPES}")
            check_indices(idx, p.numel(), f"masks[{self._name(p)}]")
            checked[p] = idx.to(device=p.device, dtype=torch.int32)

        for p in self._mask_of:
            self.state.pop(p, None)  # old compact state: gone, whatever becomes of the param
        self._mask_of = {}
        self._buckets = []
        for gi, group in enumerate(self.param_groups):
            keyed: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
            for p in group["params"]:
                if p in checked:
                    self.state.pop(p, None)  # dense state of a param that becomes masked
                    keyed.setdefault((p.device, p.dtype), []).append(p)
            for (device, _), params in keyed.items():
                self._buckets.append(self._make_bucket(gi, device, params, [checked[p] for p in params]))

    def _make_bucket(self, gi: int, device: torch.device, params: list[nn.Parameter], idxs: list[torch.Tensor]) -> _Bucket:
        offsets = [0]
        for i in idxs:
            offsets.append(offsets[-1] + i.numel())
        k = offsets[-1]
        amsgrad = self.param_groups[gi]["amsgrad"]
        b = _Bucket(
            group=gi,
            params=params,
            offsets=offsets,
            idx=torch.cat(idxs) if idxs else torch.empty(0, dtype=torch.int32, device=device),
            exp_avg=torch.zeros(k, dtype=torch.float32, device=device),
            exp_avg_sq=torch.zeros(k, dtype=torch.float32, device=device),
            max_exp_avg_sq=torch.zeros(k, dtype=torch.float32, device=device) if amsgrad else None,
            steps=torch.zeros(len(params), dtype=torch.float32, device=device),
            scores=[torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params]
            if self.track_scores else None,
        )
        for t, p in enumerate(params):
            lo, hi = offsets[t], offsets[t + 1]
            state = {
                "step": b.steps[t],
                "exp_avg": b.exp_avg[lo:hi],
                "exp_avg_sq": b.exp_avg_sq[lo:hi],
                "mask_indices": b.idx[lo:hi],
                "param_shape": tuple(p.shape),
            }
            if b.max_exp_avg_sq is not None:
                state["max_exp_avg_sq"] = b.max_exp_avg_sq[lo:hi]
            if b.scores is not None:
                state["scores"] = b.scores[t]
            self.state[p] = state
            self._mask_of[p] = b.idx[lo:hi]
        return b

    @property
    def masks(self) -> dict[nn.Parameter, torch.Tensor]:
        """``{Parameter: int32 indices}`` of the masked parameters (views of the compact state)."""
        return dict(self._mask_of)

    def scores(self) -> dict[str, torch.Tensor]:
        """Scores tracked since :meth:`set_masks` (``track_scores``), by parameter name.

        For ``"grad"`` the magnitude of the signed sum is returned, as :func:`fastmask.score` does.
        Feed the result to :func:`fastmask.select` to pick the next task's masks.
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
                out[self._names[p]] = s.abs() if self.track_scores == "grad" else s.clone()
        return out

    # ------------------------------------------------------------------------------------------
    # step
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for b in self._buckets:
            self._step_bucket(b, self.param_groups[b.group], grad_scale, found_inf)
        for group in self.param_groups:
            self._step_dense(group, grad_scale, found_inf)
        return loss

    @staticmethod
    def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        return None if t is None else t.to(device, non_blocking=True)

    def _step_bucket(self, b: _Bucket, group: dict, grad_scale, found_inf) -> None:
        active = [p.grad is not None for p in b.params]
        if not any(active):
            return
        device = b.steps.device
        lr = group["lr"]
        lr_t = lr if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=torch.float64)
        beta1, beta2 = (float(x) for x in group["betas"])
        weight_decay = group["weight_decay"]
        grad_scale, found_inf = self._on(grad_scale, device), self._on(found_inf, device)

        if group["amsgrad"] and b.max_exp_avg_sq is None:
            raise RuntimeError("amsgrad was switched on after set_masks(); call set_masks() again to create its state")
        for a, e in _runs(active):
            params = b.params[a:e]
            grads = [p.grad for p in params]
            for p, g in zip(params, grads):
                if g.is_sparse:
                    raise RuntimeError(f"MaskedAdamW does not support sparse gradients ({self._name(p)})")
            whole = a == 0 and e == len(b.params)
            lo, hi = b.offsets[a], b.offsets[e]

            def part(t):
                return t if (whole or t is None) else t[lo:hi]

            steps = b.steps if whole else b.steps[a:e]
            steps.add_(1)
            wd = weight_decay
            if group["decay_unselected"] and weight_decay != 0:
                # The original code's dense AdamW decays every entry; emulate it on the whole tensor
                # (in the param's dtype, as torch does) and let the kernel skip decay.
                if found_inf is None and not isinstance(lr, torch.Tensor):
                    factor = 1 - lr * weight_decay
                else:
                    factor = 1 - lr_t.to(device) * weight_decay
                    if found_inf is not None:
                        factor = torch.where(found_inf.reshape(()) != 0, torch.ones((), device=device), factor)
                torch._foreach_mul_(params, factor)
                wd = 0.0
            ops.masked_adamw_step_(
                params, grads, part(b.idx), part(b.exp_avg), part(b.exp_avg_sq),
                [o - lo for o in b.offsets[a : e + 1]], steps, lr_t,
                beta1, beta2, group["eps"], wd, group["maximize"],
                max_exp_avg_sq=part(b.max_exp_avg_sq), grad_scale=grad_scale, found_inf=found_inf,
                scores=b.scores[a:e] if b.scores is not None else None,
                score_mode=self.track_scores or "grad",
            )
            if found_inf is not None:
                steps.sub_(found_inf.reshape(()))

    def _step_dense(self, group: dict, grad_scale, found_inf) -> None:
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None or p in self._mask_of:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"MaskedAdamW does not support sparse gradients ({self._name(p)})")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
        if not params:
            return
        from torch.optim.adam import adam
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        fused = all(p.device.type in _get_fused_kernels_supported_devices() and p.is_floating_point() for p in params)
        beta1, beta2 = group["betas"]
        if not fused and found_inf is not None:
            # Rare: a device without fused AdamW under GradScaler. Unscale here; skipping needs a sync.
            if bool(found_inf.item()):
                return
            if grad_scale is not None:
                torch._foreach_div_(grads, grad_scale.reshape(()).item())
            grad_scale = found_inf = None
        adam(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
            foreach=None if fused else True, fused=fused or None,
            grad_scale=grad_scale, found_inf=found_inf,
            amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
            decoupled_weight_decay=True,
        )

    # ------------------------------------------------------------------------------------------
    # state_dict
    # ------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()``; refuses one made for other masks or shapes.

        Masked state is copied into this optimizer's compact buffers (the masks themselves are
        not changed: build the optimizer with the saved masks, e.g. from a MaskSet file).
        """
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

        # Validate everything before writing anything.
        for sid, p in id_map.items():
            st = saved_state.get(sid)
            masked = p in self._mask_of
            if st is not None and "param_shape" in st and tuple(st["param_shape"]) != tuple(p.shape):
                raise ValueError(f"loaded state for {self._name(p)} was made for shape {tuple(st['param_shape'])}, "
                                 f"but the parameter has shape {tuple(p.shape)}")
            if masked:
                if st is None or "mask_indices" not in st:
                    raise ValueError(f"loaded state has no mask for {self._name(p)}, which this optimizer masks")
                saved_idx = st["mask_indices"]
                mine = self._mask_of[p]
                if saved_idx.numel() != mine.numel() or not torch.equal(saved_idx.to(mine.device, torch.int32), mine):
                    raise ValueError(
                        f"loaded state for {self._name(p)} was made with different masks ({saved_idx.numel()} "
                        f"selected entries saved, {mine.numel()} here, or other positions)"
                    )
                for key in _MASKED_KEYS:
                    if key in self.state[p] and (key not in st or st[key].numel() != mine.numel()):
                        raise ValueError(f"loaded state for {self._name(p)} lacks {key!r} of {mine.numel()} entries")
            elif st is not None:
                if "mask_indices" in st:
                    raise ValueError(f"loaded state has a mask for {self._name(p)}, which this optimizer updates densely")
                for key in _MASKED_KEYS:
                    if key in st and st[key].shape != p.shape:
                        raise ValueError(f"loaded state {key!r} for {self._name(p)} has shape {tuple(st[key].shape)}, "
                                         f"expected {tuple(p.shape)}")

        for sid, p in id_map.items():
            st = saved_state.get(sid)
            if p in self._mask_of:
                mine = self.state[p]
                for key in ("step", *_MASKED_KEYS, "scores"):
                    if key in mine and key in st:
                        mine[key].copy_(st[key])
            elif st is not None:
                new = {}
                for key, value in st.items():
                    if key == "step":
                        new[key] = torch.as_tensor(value, dtype=torch.float32).to(p.device).clone()
                    elif isinstance(value, torch.Tensor):
                        new[key] = value.to(dtype=p.dtype, device=p.device).clone()
                    else:
                        new[key] = value
                self.state[p] = new
            else:
                self.state.pop(p, None)
        for g, sg in zip(groups, saved_groups):
            for key, value in sg.items():
                if key not in ("params", "param_names"):
                    g[key] = value
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __repr__(self) -> str:
        k = sum(b.idx.numel() for b in self._buckets)
        return super().__repr__().replace(
            "(", f"(masked tensors: {len(self._mask_of)}, selected entries: {k}\n", 1)

