"""The fastmask operators: one schema each, their argument checks, and dispatch to a backend.

Each op is defined exactly once here as a ``torch.library`` custom op in the ``fastmask``
namespace, with a fake (meta) implementation so ``torch.compile`` and ``torch.library.opcheck``
work. Its eager kernel checks the arguments and hands them to the backend that
:mod:`fastmask.backends` picks for the tensors' device; every backend implements the same
signature, and :mod:`fastmask.reference` is the oracle the others are tested against.

``masked_adamw_step_`` works on the *flat compact layout*: the selected entries of all ``T``
tensors of one call are laid out back to back. ``idx`` holds their flat indices (int32, sorted and
unique within each tensor), ``exp_avg``/``exp_avg_sq`` their fp32 optimizer state, and the host
list ``offsets`` (length ``T + 1``, ``offsets[0] == 0``, ``offsets[-1] == idx.numel()``) marks
where tensor ``t``'s segment begins and ends.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from . import backends
from ._checks import check_segments

__all__ = ["masked_adamw_step_", "score_accumulate_", "sampled_weight_grad", "check_masked_adamw_step_",
           "state_dtype", "SCORE_MODES", "PARAM_DTYPES"]

#: Statistics ``score_accumulate_`` can add per entry: the signed gradient (the paper's score,
#: whose magnitude is taken at the end), its magnitude, or its square (empirical Fisher).
SCORE_MODES = ("grad", "abs", "fisher")
#: Parameter dtypes the compiled kernels (C++, CUDA, Triton) take; their state and arithmetic are
#: fp32. The op itself takes every real floating dtype and any strided layout: calls the compiled
#: kernels cannot serve (float64, strided views, channels_last, ...) go to the reference backend.
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """dtype of the compact optimizer state (and of the per-entry maths) for params of a dtype:
    float64 for float64 params (as torch.optim.AdamW keeps it), float32 for every other one."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32

_lib = torch.library.Library("fastmask", "DEF")
_lib.define(
    "masked_adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor idx, Tensor(b!) exp_avg, "
    "Tensor(c!) exp_avg_sq, int[] offsets, Tensor steps, Tensor lr, float beta1, float beta2, "
    "float eps, float weight_decay, bool maximize, Tensor(d!)? max_exp_avg_sq, Tensor? grad_scale, "
    "Tensor? found_inf, Tensor(e!)[] scores, str score_mode) -> ()"
)
_lib.define("score_accumulate_(Tensor(a!)[] scores, Tensor[] grads, str score_mode) -> ()")
_lib.define("sampled_weight_grad(Tensor grad_out, Tensor input, Tensor idx) -> Tensor")


# --------------------------------------------------------------------------------------------
# argument checks (metadata only: these run on every call and never read tensor data)
# --------------------------------------------------------------------------------------------
def _is_scalar_tensor(t: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point()


def _check_step_args(
    params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, lr, beta1, beta2, eps,
    weight_decay, maximize, max_exp_avg_sq, grad_scale, found_inf, scores, score_mode,
) -> None:
    n = len(params)
    if len(grads) != n:
        raise ValueError(f"grads: expected {n} gradients (one per param), got {len(grads)}")
    if len(offsets) != n + 1:
        raise ValueError(f"offsets: expected {n + 1} segment offsets for {n} params, got {len(offsets)}")
    if scores and len(scores) != n:
        raise ValueError(f"scores: expected either no score tensors or {n}, got {len(scores)}")
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode: expected one of {SCORE_MODES}, got {score_mode!r}")
    if not (0.0 <= beta1 < 1.0):
        raise ValueError(f"beta1: expected a value in [0, 1), got {beta1}")
    if not (0.0 <= beta2 < 1.0):
        raise ValueError(f"beta2: expected a value in [0, 1), got {beta2}")
    if not eps >= 0.0:
        raise ValueError(f"eps: expected a value >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay: expected a value >= 0, got {weight_decay}")

    device = params[0].device if n else idx.device
    dtype = params[0].dtype if n else None
    for t, (p, g) in enumerate(zip(params, grads)):
        if p.device != device:
            raise ValueError(f"params[{t}]: all params must be on one device; found {p.device} and {device}")
        if p.layout != torch.strided:
            raise TypeError(f"params[{t}]: expected a strided (dense) tensor, got layout {p.layout}")
        if not p.is_floating_point():
            raise TypeError(f"params[{t}]: dtype {p.dtype} is not supported; expected a real floating dtype "
                            "(step complex params through torch.view_as_real)")
        if p.dtype != dtype:
            raise TypeError(f"params[{t}]: all params of one call must share a dtype; found {p.dtype} and {dtype}")
        if g.layout != torch.strided:
            raise TypeError(f"grads[{t}]: sparse gradients are not supported (layout {g.layout})")
        if g.shape != p.shape:
            raise ValueError(f"grads[{t}]: shape {tuple(g.shape)} does not match params[{t}] {tuple(p.shape)}")
        if g.dtype != p.dtype or g.device != device:
            raise TypeError(
                f"grads[{t}]: expected {p.dtype} on {device} like params[{t}], got {g.dtype} on {g.device}"
            )
        if scores:
            s = scores[t]
            if s.shape != p.shape or s.dtype != torch.float32 or s.device != device or not s.is_contiguous():
                raise ValueError(
                    f"scores[{t}]: expected a contiguous float32 tensor of shape {tuple(p.shape)} on {device}, "
                    f"got {s.dtype} {tuple(s.shape)} on {s.device}"
                )

    if idx.dtype != torch.int32:
        raise TypeError(f"idx: expected int32 flat indices, got {idx.dtype}")
    if idx.dim() != 1 or idx.device != device or not idx.is_contiguous():
        raise ValueError(f"idx: expected a contiguous 1-D tensor on {device}, got shape {tuple(idx.shape)} on {idx.device}")
    k_total = idx.numel()
    if offsets[0] != 0 or offsets[-1] != k_total:
        raise ValueError(f"offsets: must start at 0 and end at idx.numel()={k_total}, got {list(offsets)}")
    for t in range(n):
        k = offsets[t + 1] - offsets[t]
        if k < 0:
            raise ValueError(f"offsets: must be non-decreasing, got {list(offsets)}")
        if k > params[t].numel():
            raise ValueError(f"offsets: segment {t} holds {k} indices but params[{t}] has {params[t].numel()} entries")
    sdt = state_dtype(dtype) if n else torch.float32
    for name, st in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("max_exp_avg_sq", max_exp_avg_sq)):
        if st is None:
            continue
        if st.dtype != sdt or st.shape != (k_total,) or st.device != device or not st.is_contiguous():
            raise ValueError(
                f"{name}: expected a contiguous {sdt} tensor of shape ({k_total},) on {device}, "
                f"got {st.dtype} {tuple(st.shape)} on {st.device}"
            )
    if steps.dtype != torch.float32 or steps.shape != (n,) or steps.device != device:
        raise ValueError(
            f"steps: expected a float32 tensor of shape ({n},) on {device} (one step count per param), "
            f"got {steps.dtype} {tuple(steps.shape)} on {steps.device}"
        )
    if not _is_scalar_tensor(lr) or lr.device not in (device, torch.device("cpu")):
        raise ValueError(f"lr: expected a one-element floating tensor on the CPU or on {device}")
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (not _is_scalar_tensor(t) or t.device != device):
            raise ValueError(f"{name}: expected a one-element floating tensor on {device}, got {t.dtype} {tuple(t.shape)} on {t.device}")


class _IndexCheckCache:
    """Remembers index buffers whose contents were already checked.

    Reading every index on every step would cost a pass over ``idx`` (and a host sync on a GPU).
    An optimizer passes the same buffer (or views of it) each step, so a check is cached per base
    tensor, keyed by the view's position, the segment layout and the tensor's version counter:
    any in-place write to the buffer bumps the version and forces a new check.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int, set]] = {}

    def _forget(self, key: int) -> None:
        self._entries.pop(key, None)

    def check(self, idx: torch.Tensor, offsets: Sequence[int], numels: list[int]) -> None:
        if idx.device.type == "meta":
            return  # no values to read (a deferred-init model); the real buffers are checked later
        if idx.is_inference():
            # Made under torch.inference_mode(): no version counter to key a cache on; check each call.
            check_segments(idx, list(offsets), numels, "idx")
            return
        base = idx._base if idx._base is not None else idx
        key = id(base)
        version = idx._version
        layout = (idx.storage_offset(), idx.numel(), tuple(offsets), tuple(numels))
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is base and entry[1] == version and layout in entry[2]:
            return
        check_segments(idx, list(offsets), numels, "idx")
        if entry is None or entry[0]() is not base or entry[1] != version:
            ref = weakref.ref(base, lambda _r, k=key: self._forget(k))
            entry = (ref, version, set())
            self._entries[key] = entry
        entry[2].add(layout)


_index_checks = _IndexCheckCache()


def _check_score_args(scores, grads, mode) -> None:
    if len(scores) != len(grads):
        raise ValueError(f"scores: expected {len(grads)} score tensors (one per gradient), got {len(scores)}")
    if mode not in SCORE_MODES:
        raise ValueError(f"mode: expected one of {SCORE_MODES}, got {mode!r}")
    for t, (s, g) in enumerate(zip(scores, grads)):
        if g.layout != torch.strided:
            raise TypeError(f"grads[{t}]: sparse gradients are not supported (layout {g.layout})")
        if not g.is_floating_point():
            raise TypeError(f"grads[{t}]: expected a floating dtype, got {g.dtype}")
        if s.dtype != torch.float32:
            raise TypeError(f"scores[{t}]: expected float32, got {s.dtype}")
        if s.shape != g.shape:
            raise ValueError(f"scores[{t}]: shape {tuple(s.shape)} does not match grads[{t}] {tuple(g.shape)}")
        if s.device != g.device:
            raise ValueError(f"scores[{t}]: on {s.device} but grads[{t}] is on {g.device}")
        if not s.is_contiguous() or not g.is_contiguous():
            raise ValueError(f"scores[{t}] and grads[{t}] must be contiguous")


# --------------------------------------------------------------------------------------------
# eager kernels: check, then route to the backend picked for the device
# --------------------------------------------------------------------------------------------
def _masked_adamw_step_impl(
    params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, lr, beta1, beta2, eps,
    weight_decay, maximize, max_exp_avg_sq, grad_scale, found_inf, scores, score_mode,
) -> None:
    args = (params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, lr, beta1, beta2, eps,
            weight_decay, maximize, max_exp_avg_sq, grad_scale, found_inf, scores, score_mode)
    _check_step_args(*args)
    if not params:
        return
    _index_checks.check(idx, offsets, [p.numel() for p in params])
    backend = backends.resolve(params[0].device.type, _call_features(params, grads))
    mutated = [*params, exp_avg, exp_avg_sq, *scores]
    if max_exp_avg_sq is not None:
        mutated.append(max_exp_avg_sq)
    try:
        backend.masked_adamw_step_(*args)
    finally:
        # Also when a kernel raised after stepping the valid entries (an out-of-range index that
        # bypassed the checks above): what it wrote must still be seen by autograd and the cache.
        _bump_versions(mutated)


def _call_features(params, grads) -> backends.Call:
    """What a backend must support to serve a masked step on these tensors."""
    return backends.Call(
        dtype=params[0].dtype,
        contiguous=all(p.is_contiguous() for p in params) and all(g.is_contiguous() for g in grads),
    )


def check_masked_adamw_step_(
    params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, lr, beta1, beta2, eps, weight_decay,
    maximize, *, max_exp_avg_sq=None, grad_scale=None, found_inf=None, scores=None, score_mode="grad",
) -> None:
    """Every check :func:`masked_adamw_step_` makes (index contents included, cached like the
    op's), without stepping: a caller that makes several calls validates them all first, so that
    an error leaves every tensor as it was. Also picks the backend, so an unavailable forced one
    is reported here."""
    if not isinstance(lr, torch.Tensor):
        lr = torch.tensor(float(lr), dtype=torch.float64)
    params, grads = list(params), list(grads)
    _check_step_args(params, grads, idx, exp_avg, exp_avg_sq, [int(o) for o in offsets], steps, lr,
                     float(beta1), float(beta2), float(eps), float(weight_decay), bool(maximize),
                     max_exp_avg_sq, grad_scale, found_inf, list(scores or []), score_mode)
    if params:
        _index_checks.check(idx, offsets, [p.numel() for p in params])
        backends.pick(params[0].device.type, _call_features(params, grads))


def _score_accumulate_impl(scores, grads, score_mode) -> None:
    _check_score_args(scores, grads, score_mode)
    if not scores:
        return
    backends.resolve(scores[0].device.type).score_accumulate_(scores, grads, score_mode)
    _bump_versions(scores)


def _check_sampled_args(grad_out, input, idx) -> None:
    if grad_out.dim() != 2 or input.dim() != 2:
        raise ValueError(f"grad_out, input: expected 2-D [T, out] and [T, in], got shapes {tuple(grad_out.shape)} and "
                         f"{tuple(input.shape)}")
    if grad_out.shape[0] != input.shape[0]:
        raise ValueError(f"input: {input.shape[0]} rows, but grad_out has {grad_out.shape[0]} (one per token)")
    for name, t in (("grad_out", grad_out), ("input", input)):
        if not t.is_floating_point() or t.layout != torch.strided:
            raise TypeError(f"{name}: expected a dense floating tensor, got {t.dtype} ({t.layout})")
    if input.dtype != grad_out.dtype:
        raise TypeError(f"input: dtype {input.dtype} differs from grad_out's {grad_out.dtype}")
    if idx.dtype != torch.int32 or idx.dim() != 1:
        raise TypeError(f"idx: expected a 1-D int32 tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
    if not (grad_out.device == input.device == idx.device):
        raise ValueError(f"grad_out, input, idx: expected one device, got {grad_out.device}, {input.device}, "
                         f"{idx.device}")


def _sampled_weight_grad_impl(grad_out, input, idx) -> torch.Tensor:
    _check_sampled_args(grad_out, input, idx)
    idx = idx.contiguous()
    call = backends.Call(dtype=grad_out.dtype, contiguous=True, op="sampled_weight_grad")
    return backends.resolve(grad_out.device.type, call).sampled_weight_grad(grad_out, input, idx)


def _bump_versions(tensors: list[torch.Tensor]) -> None:
    # Compiled backends write through raw pointers; bump the version counters of what the op
    # mutates, as torch's in-place ops do, so autograd still detects a tensor saved for backward
    # and modified afterwards (and the index check cache sees writes).
    # Tensors made under torch.inference_mode() have no version counter.
    torch.autograd.graph.increment_version([t for t in tensors if not t.is_inference()])


_lib.impl("masked_adamw_step_", _masked_adamw_step_impl, "CompositeExplicitAutograd")
_lib.impl("score_accumulate_", _score_accumulate_impl, "CompositeExplicitAutograd")
_lib.impl("sampled_weight_grad", _sampled_weight_grad_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("fastmask::masked_adamw_step_", lib=_lib)
def _masked_adamw_step_fake(
    params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, lr, beta1, beta2, eps,
    weight_decay, maximize, max_exp_avg_sq, grad_scale, found_inf, scores, score_mode,
) -> None:
    _check_step_args(params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, lr, beta1, beta2,
                     eps, weight_decay, maximize, max_exp_avg_sq, grad_scale, found_inf, scores, score_mode)


@torch.library.register_fake("fastmask::score_accumulate_", lib=_lib)
def _score_accumulate_fake(scores, grads, score_mode) -> None:
    _check_score_args(scores, grads, score_mode)


@torch.library.register_fake("fastmask::sampled_weight_grad", lib=_lib)
def _sampled_weight_grad_fake(grad_out, input, idx) -> torch.Tensor:
    _check_sampled_args(grad_out, input, idx)
    return grad_out.new_empty(idx.shape, dtype=state_dtype(grad_out.dtype))


# --------------------------------------------------------------------------------------------
# Python entry points (keyword-friendly wrappers around torch.ops.fastmask.*)
# --------------------------------------------------------------------------------------------
def masked_adamw_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    idx: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    offsets: Sequence[int],
    steps: torch.Tensor,
    lr: torch.Tensor | float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    maximize: bool = False,
    *,
    max_exp_avg_sq: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    scores: Sequence[torch.Tensor] | None = None,
    score_mode: str = "grad",
) -> None:
    r"""One AdamW step on the selected entries of several tensors, in place.

    For tensor ``t`` and each selected flat position ``i = idx[j]``, ``offsets[t] <= j < offsets[t+1]``,
    with ``s = steps[t]`` (already incremented for this step) and all arithmetic in fp32::

        g  = grads[t][i] / grad_scale            (if grad_scale is given)
        g  = -g                                  (if maximize)
        p  = params[t][i] * (1 - lr * weight_decay)
        m  = exp_avg[j]    = lerp(m, g, 1 - beta1)
        v  = exp_avg_sq[j] = beta2 * v + (1 - beta2) * g * g
        v' = max_exp_avg_sq[j] = max(max_exp_avg_sq[j], v)   (amsgrad; else v' = v)
        params[t][i] = p - lr / (1 - beta1**s) * m / (sqrt(v') / sqrt(1 - beta2**s) + eps)

    These are ``torch.optim.AdamW``'s maths. Entries not in ``idx`` are never read or written.
    Params may have any real floating dtype and any strided layout (flat indices are positions in
    ``param.reshape(-1)``, the row-major order of its shape); state is float32, or float64 for
    float64 params (:func:`state_dtype`). The compiled backends serve float32/bfloat16/float16
    params whose params and grads are contiguous; other calls go to the reference backend.
    If ``found_inf`` is given and non-zero, nothing changes (GradScaler's skipped step), without a
    host sync. If ``scores`` is given (one float32 tensor per param, full shape), every entry's
    gradient statistic (after unscaling, before ``maximize``) is also added to it in the same pass,
    as :func:`score_accumulate_` would. ``lr`` is a one-element tensor on the CPU or the params'
    device (a Python float is converted).

    Index contents (range, order) are checked the first time a buffer is seen and again after any
    in-place write to it; all other checks run on every call and read no tensor data.
    """
    if not isinstance(lr, torch.Tensor):
        lr = torch.tensor(float(lr), dtype=torch.float64)
    torch.ops.fastmask.masked_adamw_step_(
        list(params), list(grads), idx, exp_avg, exp_avg_sq, [int(o) for o in offsets], steps, lr,
        float(beta1), float(beta2), float(eps), float(weight_decay), bool(maximize),
        max_exp_avg_sq, grad_scale, found_inf, list(scores or []), score_mode,
    )


def score_accumulate_(scores: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], mode: str = "grad") -> None:
    """Add each gradient's per-entry statistic to its float32 score tensor, in place.

    ``mode``: ``"grad"`` adds ``g`` (signed; the paper's score is ``|sum g|``, taken at the end),
    ``"abs"`` adds ``|g|``, ``"fisher"`` adds ``g * g``. Arithmetic in fp32 whatever the
    gradient dtype. Cheap enough to call from a post-accumulate-grad hook, one tensor at a time.
    """
    torch.ops.fastmask.score_accumulate_(list(scores), list(grads), mode)


def sampled_weight_grad(grad_out: torch.Tensor, input: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    r"""The gradient of a linear layer's weight at selected entries only.

    For ``y = input @ weight.T`` (``weight`` of shape ``[out, in]``), ``grad_out`` ``[T, out]`` and
    ``input`` ``[T, in]`` (tokens flattened into ``T``), returns ``v`` with
    ``v[j] = sum_t grad_out[t, r] * input[t, c]`` for ``idx[j] = r * in + c``: the entries ``idx``
    of ``grad_out.T @ input`` (flat positions in the weight, as masks hold them). The CPU kernel, the
    Triton kernel and the reference compute only those entries (``K * T`` multiply-adds instead of
    ``out * in * T``); the extension's CUDA kernel lets cuBLAS compute the product in row chunks of
    at most 2^22 entries (tensor cores make that cheaper on a GPU than scattered dot products) and
    gathers the selected ones, so the whole gradient never exists at once. Sums in float32
    (float64 for float64 inputs; fp32 inputs on CUDA follow torch's TF32 setting for matmuls); the
    summation order is the backend's, so results agree with the dense product to rounding, not bit
    for bit. ``idx`` is 1-D int32; an index outside ``[0, out * in)``
    raises ``IndexError``.
    """
    return torch.ops.fastmask.sampled_weight_grad(grad_out, input, idx)
