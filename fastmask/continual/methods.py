"""The four methods compared by the job, as (optimizer, gradient hook) pairs for one task.

``spu``           fastmask: score the c_fc weights of both towers on the task's data
                  (:func:`fastmask.score`), keep the top ``density`` entries per tensor
                  (:func:`fastmask.select`), train with :class:`fastmask.optim.MaskedAdamW`: the
                  c_fc weights change only at the selected entries, their biases and
                  ``visual.proj`` are trained densely, everything else is frozen.
``spu-original``  the original SPU code's behaviour: the same scores and selection, but dense
                  boolean masks multiplied into the c_fc weights' gradients after ``backward`` and
                  stock ``torch.optim.AdamW`` over the trained parameters, so weight decay also
                  shrinks the unselected entries.
``full``          ``torch.optim.AdamW`` over every parameter.
``frozen``        no training (the base model, evaluated after each task).
``spu-noproj``    (not run by default) ``spu`` with ``visual.proj`` frozen: only the c_fc biases
                  are trained densely. On the embedded default, the dense ``visual.proj`` (one
                  64x64 map applied to every image embedding) causes most of SPU's control-set loss.

Each task gets a fresh optimizer (the original work re-creates it per task). Every optimizer uses
PyTorch's default AdamW implementation for its dense parameters (on a CPU the single-tensor loop;
``fused=True`` makes every method use the fused kernel instead).

Scoring (:class:`Scoring`). ``spu`` scores with the job's training loss (contrastive), each
batch's gradient summed once, on a fixed number of batches. ``spu-original`` scores as the
original code does: the squared L2 norm of the image-to-text logits (no labels), gradient buffers
never zeroed between batches (running sums, early batches weigh more), and the original's loop
bounds: batches up to index ``floor(fraction * batches) + 1``, then on while any score entry is
below 1e-12 in magnitude, to the end of the epoch at most.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

import fastmask

METHODS = ("spu", "spu-original", "full", "frozen", "spu-noproj")
DEFAULT_METHODS = ("spu", "spu-original", "full", "frozen")
SCORE_LOSSES = ("contrastive", "l2-logits")
ACCUMULATE_MODES = fastmask.scoring.ACCUMULATE_MODES
SCORE_STOPS = ("fixed", "original")
#: The original code's threshold: it keeps scoring while any score entry is below it in magnitude.
ORIGINAL_THRESHOLD = 1e-12


@dataclass(frozen=True)
class Scoring:
    """How a method scores the c_fc weights before selecting its mask.

    ``loss``: ``"contrastive"`` (the training loss) or ``"l2-logits"`` (the original code's squared L2
    norm of each image's logits row, no labels); ``accumulate``: ``"batch-sum"`` or
    ``"running-sum"`` (:func:`fastmask.score`); ``stop``: ``"fixed"`` (exactly the scoring batches:
    ``--score-batches``, or ``ceil(fraction * batches)``) or ``"original"`` (the original loop's
    bounds: ``floor(fraction * batches) + 2`` batches, or ``--score-batches``, then on while any
    entry is below 1e-12, to the end of the epoch at most).
    """

    loss: str = "contrastive"
    accumulate: str = "batch-sum"
    stop: str = "fixed"

    def describe(self) -> str:
        loss = {"contrastive": "contrastive loss", "l2-logits": "||logits||^2"}[self.loss]
        acc = {"batch-sum": "batch sums", "running-sum": "running sums"}[self.accumulate]
        stop = {"fixed": "fixed batches", "original": "original stop rule"}[self.stop]
        return f"{loss}, {acc}, {stop}"

    def batches(self, n_batches: int, fraction: float, score_batches: int | None) -> tuple[int, int | None]:
        """(batches scored at least, at most this many more while an entry is below 1e-12 or None)."""
        if self.stop == "fixed":
            n = score_batches or max(1, math.ceil(fraction * n_batches))
            return min(n, n_batches), None
        n = min(score_batches or math.floor(fraction * n_batches) + 2, n_batches)
        return n, n_batches - n


#: Each SPU method's scoring; ``--score-loss``/``--score-accumulate``/``--score-stop`` override it for all.
SCORING = {
    "spu": Scoring(),
    "spu-noproj": Scoring(),
    "spu-original": Scoring("l2-logits", "running-sum", "original"),
}


def scoring_for(method: str, loss: str | None = None, accumulate: str | None = None,
                stop: str | None = None) -> Scoring | None:
    """The scoring of ``method`` (None for methods without a mask), with any overrides."""
    if method not in SCORING:
        return None
    base = SCORING[method]
    return Scoring(loss or base.loss, accumulate or base.accumulate, stop or base.stop)


@dataclass
class TaskSetup:
    """What a method trains on one task."""

    optimizer: torch.optim.Optimizer | None
    before_step: Callable[[], None] = lambda: None  # called between backward() and step()
    masks: fastmask.MaskSet | None = None
    trained: list[str] = field(default_factory=list)  # names of parameters that may change


def setup_task(method: str, model: nn.Module, score_batches: Iterable, loss_fn, *, lr: float, weight_decay: float,
               density: float, score_batches_n: int, betas=(0.9, 0.98), eps: float = 1e-6,
               progress: bool = True, scoring: Scoring | None = None, max_extra_batches: int | None = None,
               fused: bool | None = None) -> TaskSetup:
    """Freeze/unfreeze ``model``, compute masks if the method needs them, build the optimizer.

    ``loss_fn`` is the scoring loss; ``scoring`` says how to accumulate and when to stop
    (default: the method's, :data:`SCORING`); ``score_batches_n`` batches are scored at least, and
    with the original stop rule up to ``max_extra_batches`` more. ``fused`` goes to every optimizer.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        return TaskSetup(None)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                fused=fused)
        return TaskSetup(opt, trained=[n for n, _ in model.named_parameters()])

    # spu and spu-original: localize, score, select.
    targets = fastmask.find_targets(model, "open_clip")
    if method == "spu-noproj":
        targets = fastmask.find_targets(model, "open_clip", dense=[n for n in fastmask.PRESETS["open_clip"].dense
                                                                   if n != "visual.proj"])
    fastmask.freeze(model, targets)
    scoring = scoring or SCORING[method]
    original_stop = scoring.stop == "original"
    scores = fastmask.score(model, score_batches, loss_fn, targets=targets, mode="grad",
                            accumulate=scoring.accumulate, max_batches=score_batches_n,
                            until_nonzero=ORIGINAL_THRESHOLD if original_stop else None,
                            max_extra_batches=max_extra_batches if original_stop else None, progress=progress)
    masks = fastmask.select(scores, density)
    if method in ("spu", "spu-noproj"):
        opt = fastmask.optim.MaskedAdamW(targets.parameters(), lr=lr, betas=betas, eps=eps,
                                         weight_decay=weight_decay, masks=masks, model=model, fused=fused)
        return TaskSetup(opt, masks=masks, trained=targets.names)

    # spu-original: dense masks multiplied into the gradients, stock AdamW (decays every entry).
    dense = {targets.masked[n]: m.to_bool(targets.masked[n].device).to(targets.masked[n].dtype)
             for n, m in masks.items()}

    def mask_gradients() -> None:
        for p, m in dense.items():
            if p.grad is not None:
                p.grad.mul_(m)

    opt = torch.optim.AdamW(targets.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
    return TaskSetup(opt, before_step=mask_gradients, masks=masks, trained=targets.names)


def grad_bytes(model: nn.Module) -> int:
    """Bytes of the gradients alive now (call after ``backward``)."""
    return sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)


def state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes held by the optimizer's state tensors (views counted once per storage)."""
    if optimizer is None:
        return 0
    seen, total = set(), 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                key = (v.untyped_storage().data_ptr(), v.device)
                if key not in seen:
                    seen.add(key)
                    total += v.untyped_storage().nbytes()
    return total
