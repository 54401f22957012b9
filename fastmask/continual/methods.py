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

Each task gets a fresh optimizer (the original work re-creates it per task).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

import fastmask

METHODS = ("spu", "spu-original", "full", "frozen", "spu-noproj")
DEFAULT_METHODS = ("spu", "spu-original", "full", "frozen")


@dataclass
class TaskSetup:
    """What a method trains on one task."""

    optimizer: torch.optim.Optimizer | None
    before_step: Callable[[], None] = lambda: None  # called between backward() and step()
    masks: fastmask.MaskSet | None = None
    trained: list[str] = field(default_factory=list)  # names of parameters that may change


def setup_task(method: str, model: nn.Module, score_batches: Iterable, loss_fn, *, lr: float, weight_decay: float,
               density: float, score_batches_n: int, betas=(0.9, 0.98), eps: float = 1e-6,
               progress: bool = True) -> TaskSetup:
    """Freeze/unfreeze ``model``, compute masks if the method needs them, build the optimizer."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        return TaskSetup(None)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        return TaskSetup(opt, trained=[n for n, _ in model.named_parameters()])

    # spu and spu-original: localize, score, select.
    targets = fastmask.find_targets(model, "open_clip")
    if method == "spu-noproj":
        targets = fastmask.find_targets(model, "open_clip", dense=[n for n in fastmask.PRESETS["open_clip"].dense
                                                                   if n != "visual.proj"])
    fastmask.freeze(model, targets)
    scores = fastmask.score(model, score_batches, loss_fn, targets=targets, mode="grad",
                            max_batches=score_batches_n, progress=progress)
    masks = fastmask.select(scores, density)
    if method in ("spu", "spu-noproj"):
        opt = fastmask.optim.MaskedAdamW(targets.parameters(), lr=lr, betas=betas, eps=eps,
                                         weight_decay=weight_decay, masks=masks, model=model)
        return TaskSetup(opt, masks=masks, trained=targets.names)

    # spu-original: dense masks multiplied into the gradients, stock AdamW (decays every entry).
    dense = {targets.masked[n]: m.to_bool(targets.masked[n].device).to(targets.masked[n].dtype)
             for n, m in masks.items()}

    def mask_gradients() -> None:
        for p, m in dense.items():
            if p.grad is not None:
                p.grad.mul_(m)

    opt = torch.optim.AdamW(targets.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
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
