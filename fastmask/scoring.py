"""Gradient scores of target parameters, accumulated over batches of the new task's data.

``score`` runs forward/backward on the caller's loss for a number of batches. Only the target
parameters require grad during the pass, so PyTorch computes no weight gradient for any other
parameter. Each target's gradient is folded into its fp32 score by the ``score_accumulate_`` op
from a post-accumulate-grad hook and freed at once, so at most one target gradient is alive at a
time beyond what autograd itself holds.

The original SPU code scores differently, and ``score`` can reproduce it exactly:

- its loss is :func:`l2_logits_loss` (the squared L2 norm of each image's row of image-to-text
  logits, averaged over the batch; no labels), not the training loss;
- it never zeroes ``.grad`` between scoring batches, so after batch ``b`` the gradient buffer holds
  the running sum ``G_b = g_1 + ... + g_b`` and the score adds those running sums
  (``accumulate="running-sum"``): the paper's ``|sum|`` becomes ``|sum_b (n - b + 1) g_b|``, and
  early batches weigh more;
- after its quarter epoch it keeps scoring while any score entry is below 1e-12 in magnitude
  (``until_nonzero=1e-12``), up to the end of its data loader (``max_extra_batches`` caps it here).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from . import ops
from .grads import dense_weight_grads
from .optim.masked_adamw import no_step_in_backward
from .targets import Targets, find_targets

__all__ = ["score", "SCORE_MODES", "ACCUMULATE_MODES", "l2_logits", "l2_logits_loss"]

SCORE_MODES = ops.SCORE_MODES
#: How gradients are summed over batches: ``"batch-sum"`` (each batch's gradient once) or
#: ``"running-sum"`` (the original SPU code: ``.grad`` never zeroed, running sums added).
ACCUMULATE_MODES = ("batch-sum", "running-sum")


def l2_logits(logits_per_image: torch.Tensor) -> torch.Tensor:
    """The original SPU code's scoring loss on a ``[images, texts]`` logits matrix: the squared L2
    norm of each image's row, averaged over images (``torch.norm(logits, p="fro", dim=1).pow(2).mean()``
    in the original; ``vector_norm`` computes the same norm)."""
    return torch.linalg.vector_norm(logits_per_image, ord=2, dim=1).pow(2).mean()


def l2_logits_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """A ``loss_fn`` for :func:`score` that reproduces the original SPU code's scoring loss on an
    open_clip CLIP: ``batch = (images, texts)`` with one tokenized text per image (the original
    uses each image's class prompt); ``model(images, texts)`` gives normalized features and the
    logit scale, the logits are ``logit_scale * image_features @ text_features.T`` (``[B, B]``),
    and the loss is :func:`l2_logits` of them. No labels are used. Pass
    ``accumulate="running-sum", until_nonzero=1e-12`` to :func:`score` for the rest of the
    original's protocol."""
    images, texts = batch[0], batch[1]
    image_features, text_features, logit_scale = model(images, texts)[:3]
    return l2_logits(logit_scale * image_features @ text_features.T)


def _resolve_targets(model: nn.Module, targets: Any) -> dict[str, nn.Parameter]:
    if targets is None:
        # find_targets detects the preset that fits the model and logs which (INFO, fastmask.targets).
        return find_targets(model).masked
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
    accumulate: str = "batch-sum",
    max_batches: int | None = None,
    until_nonzero: float | None = None,
    max_extra_batches: int | None = None,
    progress: bool = True,
    process_group: Any = None,
    all_reduce: bool = True,
) -> dict[str, torch.Tensor]:
    """Accumulate per-entry gradient scores of the target parameters over ``batches``.

    Args:
        model: the model; its ``requires_grad`` flags and the targets' ``.grad`` are restored
            afterwards, whatever happens.
        batches: any iterable; each item is passed to ``loss_fn`` as is.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` (e.g. CLIP's contrastive loss, or the
            original work's squared L2 norm of the image-to-text logits).
        targets: the parameters to score: ``None`` (the masked targets of the one preset that fits
            the model, detected by :func:`~fastmask.find_targets` and logged at INFO level on the
            ``fastmask.targets`` logger; a ``ValueError`` lists the presets if none or several
            fit), a preset name (``"open_clip"``, ``"hf_llama"``, ...; ``"auto"`` is the same as
            ``None``), a :class:`~fastmask.Targets` (its masked parameters), a mapping of names
            to parameters, or names/patterns.
        mode: ``"grad"``: ``|sum_b g_b|`` (the paper's score; signed accumulation, magnitude at
            the end); ``"abs"``: ``sum_b |g_b|``; ``"fisher"``: ``sum_b g_b**2``.
        accumulate: ``"batch-sum"``: ``g_b`` is batch ``b``'s gradient, folded in and freed at
            once. ``"running-sum"``: the original SPU code's accumulation: ``.grad`` is not zeroed
            between batches, so ``g_b`` above becomes ``G_b = g_1 + ... + g_b`` (summed into the
            gradient buffer by autograd, in the parameter's dtype, exactly as the original);
            one gradient per target stays alive during the pass.
        max_batches: stop after this many batches (the original work: a quarter of an epoch).
        until_nonzero: after ``max_batches`` batches, keep scoring one batch at a time while any
            target's score has an entry whose magnitude is below this threshold (the original
            code: ``1e-12``), until ``batches`` ends or ``max_extra_batches`` more batches were
            scored; a warning says how many entries are still below if it stops before they are
            all above. Needs ``max_batches``; ``batches`` without a length needs
            ``max_extra_batches`` (a target with a structurally zero gradient would never stop).
        max_extra_batches: at most this many batches beyond ``max_batches`` (default: no limit
            but the end of ``batches``).
        progress: show a tqdm progress bar.
        process_group: under an initialized ``torch.distributed`` group (default: the default
            group), each rank scores its own ``batches`` and the accumulated statistics are summed
            across ranks *before* the magnitude is taken (signed sums for ``"grad"``), so every rank
            returns identical scores and :func:`fastmask.select` picks identical masks everywhere:
            the result equals scoring the union of all ranks' batches on one process, up to
            summation order (:func:`fastmask.distributed.all_reduce_scores`). A
            ``DistributedDataParallel`` model is scored through its ``.module`` (no gradient
            all-reduce during scoring; ``loss_fn`` gets the module and the score names are the
            module's). With ``until_nonzero``, every rank scores the same number of batches: extra
            batches go on while any rank still has an entry below the threshold in its own sums
            and every rank still has a batch. With ``accumulate="running-sum"``, each rank's
            running sums start at its own first batch. FSDP2 (``fully_shard``) targets are scored
            from the gradients FSDP2 itself reduce-scatters (the mean over ranks of each step's
            gradients) and gathered to full-shape tensors on every rank: for ``"grad"`` the same
            sum as above; for ``"abs"``/``"fisher"`` the statistic of each step's gradient summed
            over the ranks (as one process scoring the ranks' b-th batches as one batch).
        all_reduce: ``False`` keeps each rank's own scores (no collective; FSDP2 targets are still
            reduced by FSDP2 itself).

    Returns:
        ``{name: fp32 score tensor of the parameter's shape, on its device}``.
    """
    from .distributed import all_reduce_scores, resolve_group

    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # its reducer would all-reduce every gradient and expect a step
    group = resolve_group(process_group) if all_reduce else None
    if mode not in SCORE_MODES:
        raise ValueError(f"mode: expected one of {SCORE_MODES}, got {mode!r}")
    if accumulate not in ACCUMULATE_MODES:
        raise ValueError(f"accumulate: expected one of {ACCUMULATE_MODES}, got {accumulate!r}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches: expected a positive number or None, got {max_batches}")
    if until_nonzero is not None:
        if isinstance(until_nonzero, bool) or not isinstance(until_nonzero, (int, float)) \
                or not math.isfinite(until_nonzero) or until_nonzero <= 0:
            raise ValueError(f"until_nonzero: expected a positive finite threshold or None, got {until_nonzero!r}")
        if max_batches is None:
            raise ValueError("until_nonzero: needs max_batches (scoring goes on past max_batches while some "
                             "score entry is below the threshold)")
        if max_extra_batches is None and not hasattr(batches, "__len__"):
            raise ValueError("max_extra_batches: needed with until_nonzero when batches has no length "
                             "(a target whose gradient is zero somewhere would be scored forever)")
    if max_extra_batches is not None and (isinstance(max_extra_batches, bool) or not isinstance(max_extra_batches, int)
                                          or max_extra_batches < 0):
        raise ValueError(f"max_extra_batches: expected a non-negative int or None, got {max_extra_batches!r}")
    running = accumulate == "running-sum"
    named = _resolve_targets(model, targets)
    if not named:
        raise ValueError("targets: no parameter to score")
    from .distributed import is_dtensor

    # FSDP2 (DTensor) targets: each rank accumulates its shard of the reduce-scattered gradients.
    sharded = [n for n, p in named.items() if is_dtensor(p)]  # ordered: the gathers are collectives
    scores = {n: torch.zeros((p.to_local() if n in sharded else p).shape, dtype=torch.float32, device=p.device)
              for n, p in named.items()}
    hits = dict.fromkeys(named, 0)

    all_params = list(model.parameters())
    saved_flags = [p.requires_grad for p in all_params]
    saved_grads = {n: p.grad for n, p in named.items()}
    handles = []

    def make_hook(name: str):
        def hook(p: torch.Tensor) -> None:
            ops.score_accumulate_([scores[name]], [p.grad.to_local() if name in sharded else p.grad], mode)
            hits[name] += 1
            if not running:
                p.grad = None  # running-sum: autograd adds the next batch's gradient to this one

        return hook

    total = max_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    n_batches = 0
    bar = None
    quiet = contextlib.ExitStack()  # whole gradients, and no optimizer stepping inside backward()
    quiet.enter_context(dense_weight_grads())
    quiet.enter_context(no_step_in_backward())
    try:
        target_ids = {id(p) for p in named.values()}
        for p in all_params:
            p.requires_grad_(id(p) in target_ids)
        for name, p in named.items():
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(make_hook(name)))

        iterator = iter(batches)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=f"fastmask.score ({mode}{', running sums' if running else ''})",
                       unit="batch")
        while True:
            extra = max_batches is not None and n_batches >= max_batches
            if extra:
                if until_nonzero is None:
                    break
                want = _count_below(scores, until_nonzero) > 0 and not (
                    max_extra_batches is not None and n_batches - max_batches >= max_extra_batches)
                batch = next(iterator, _END) if want else _END
                if group is not None:
                    # every rank takes the same decision: go on while any rank wants to and all can
                    want = _any_rank(want, group)
                    have = not _any_rank(batch is _END, group)
                    if want and not have:
                        break
                if not want or batch is _END:
                    break
                if bar is not None:
                    bar.total = n_batches + 1
                    bar.refresh()
            else:
                batch = next(iterator, _END)
                if batch is _END:
                    break
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
            if bar is not None:
                bar.update()
    finally:
        quiet.close()
        if bar is not None:
            bar.close()
        for h in handles:
            h.remove()
        for p, flag in zip(all_params, saved_flags):
            p.requires_grad_(flag)
        for n, p in named.items():
            p.grad = saved_grads[n]

    if group is not None:
        # A rank without batches still takes part (its sums are zero): the union is what counts.
        if not _any_rank(n_batches > 0, group):
            raise ValueError("batches yielded no batch to score on, on any rank")
        # signed sums: the magnitude is taken below
        all_reduce_scores({n: s for n, s in scores.items() if n not in sharded}, mode, group)
    elif n_batches == 0:
        raise ValueError("batches yielded no batch to score on")
    if sharded:
        scores.update(_gather_sharded(named, scores, sharded, mode))
    if until_nonzero is not None and n_batches >= max_batches:
        below = _count_below(scores, until_nonzero)
        if below:
            capped = max_extra_batches is not None and n_batches - max_batches >= max_extra_batches
            warnings.warn(
                f"until_nonzero: {below} score entries are still below {until_nonzero:g} in magnitude after "
                f"{n_batches} batches ({n_batches - max_batches} beyond max_batches; "
                f"{'max_extra_batches reached' if capped else 'batches ran out'})", stacklevel=2,
            )
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


_END = object()  # marks an exhausted iterator


def _gather_sharded(named, scores, sharded, mode) -> dict[str, torch.Tensor]:
    """Full-shape scores of FSDP2 targets from each rank's shard. FSDP2 averaged every gradient
    over the ranks (reduce-scatter) before it reached the score, so the shards already hold the
    whole group's statistic of the mean gradient; times the world size, the signed sum ("grad")
    is the sum of every rank's gradients, as with DDP or one process."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n in sharded:
        p = named[n]
        world = p.device_mesh.size()
        local = scores[n] * (world * world if mode == "fisher" else world)  # stat(mean) -> stat(sum)
        out[n] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                    stride=p.stride()).full_tensor()
    return out


def _any_rank(flag: bool, group: Any) -> bool:
    """True on every rank when ``flag`` is True on any rank of ``group`` (one tiny all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _count_below(scores: Mapping[str, torch.Tensor], threshold: float) -> int:
    """Entries of all scores whose magnitude is below ``threshold`` (signed sums in mode "grad")."""
    return sum(int((s.abs() < threshold).sum()) for s in scores.values())
