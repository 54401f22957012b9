"""Gradient scores of target parameters, accumulated over batches of the new task's data.

``score`` runs forward/backward on the caller's loss for a number of batches. Only the target
parameters require grad during the pass, so PyTorch computes no weight gradient for any other
parameter. Each target's gradient is folded into its fp32 score by the ``score_accumulate_`` op
from a post-accumulate-grad hook and freed at once, so at most one target gradient is alive at a
time beyond what autograd itself holds.
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from . import ops
from .targets import Targets, find_targets

__all__ = ["score", "SCORE_MODES"]

SCORE_MODES = ops.SCORE_MODES


def _resolve_targets(model: nn.Module, targets: Any) -> dict[str, nn.Parameter]:
    if targets is None:
        return find_targets(model, "open_clip").masked
    if isinstance(targets, Targets):
        return dict(targets.masked)
    if isinstance(targets, str):
        return find_targets(model, targets).masked
    if isinstance(targets, Mapping):
        return dict(targets)
    # An iterable of names or patterns.
    targets = list(targets)
    params = dict(model.named_parameters())
    if all(isinstance(t, str) and t in params for t in targets):
        return {t: params[t] for t in targets}
    return find_targets(model, None, masked=targets).masked


def score(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    targets: Targets | Mapping[str, nn.Parameter] | Iterable[str] | str | None = None,
    mode: str = "grad",
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Accumulate per-entry gradient scores of the target parameters over ``batches``.

    Args:
        model: the model; its ``requires_grad`` flags and the targets' ``.grad`` are restored
            afterwards, whatever happens.
        batches: any iterable; each item is passed to ``loss_fn`` as is.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` (e.g. CLIP's contrastive loss, or the
            original work's squared L2 norm of the image-to-text logits).
        targets: the parameters to score: ``None`` (the ``open_clip`` preset's masked targets),
            a preset name, a :class:`~fastmask.Targets` (its masked parameters), a mapping of
            names to parameters, or names/patterns.
        mode: ``"grad"``: ``|sum_b g_b|`` (the paper's score; signed accumulation, magnitude at
            the end); ``"abs"``: ``sum_b |g_b|``; ``"fisher"``: ``sum_b g_b**2``.
        max_batches: stop after this many batches (the original work: a quarter of an epoch).
        progress: show a tqdm progress bar.

    Returns:
        ``{name: fp32 score tensor of the parameter's shape, on its device}``.
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"mode: expected one of {SCORE_MODES}, got {mode!r}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches: expected a positive number or None, got {max_batches}")
    named = _resolve_targets(model, targets)
    if not named:
        raise ValueError("targets: no parameter to score")
    scores = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in named.items()}
    hits = dict.fromkeys(named, 0)

    all_params = list(model.parameters())
    saved_flags = [p.requires_grad for p in all_params]
    saved_grads = {n: p.grad for n, p in named.items()}
    handles = []

    def make_hook(name: str):
        def hook(p: torch.Tensor) -> None:
            ops.score_accumulate_([scores[name]], [p.grad], mode)
            hits[name] += 1
            p.grad = None

        return hook

    total = max_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    n_batches = 0
    try:
        target_ids = {id(p) for p in named.values()}
        for p in all_params:
            p.requires_grad_(id(p) in target_ids)
        for name, p in named.items():
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(make_hook(name)))

        iterator = itertools.islice(batches, max_batches) if max_batches is not None else batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=total, desc=f"fastmask.score ({mode})", unit="batch")
        for batch in iterator:
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("loss_fn must return a scalar loss tensor")
            if not loss.requires_grad:
                raise ValueError("loss_fn returned a loss that does not depend on any target parameter")
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss_fn returned a non-finite loss ({value}) at batch {n_batches}")
            loss.backward()
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(all_params, saved_flags):
            p.requires_grad_(flag)
        for n, p in named.items():
            p.grad = saved_grads[n]

    if n_batches == 0:
        raise ValueError("batches yielded no batch to score on")
    silent = [n for n, c in hits.items() if c == 0]
    if silent:
        warnings.warn(
            f"no gradient reached {len(silent)} target(s) during scoring (e.g. {silent[0]!r}); "
            "their scores are zero", stacklevel=2,
        )
    if mode == "grad":
        for s in scores.values():
            s.abs_()
    return scores
