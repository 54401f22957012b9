"""Hugging Face ``transformers.Trainer`` with :class:`~fastmask.MaskedAdamW`.

The Trainer already runs any optimizer passed as ``optimizers=(optimizer, scheduler)``;
:class:`FastmaskCallback` adds what a selective update needs around it::

    import fastmask, fastmask.hf                      # fastmask.hf imports transformers
    from transformers import Trainer, TrainingArguments

    targets = fastmask.find_targets(model, "hf_llama")  # gate_proj/up_proj weights masked
    fastmask.freeze(model, targets)                      # everything else: requires_grad=False
    masks = fastmask.select(fastmask.score(model, batches, loss_fn, targets=targets), density=0.1)
    opt = fastmask.MaskedAdamW(targets.parameters(), lr=1e-4, masks=masks, model=model)
    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                      optimizers=(opt, None), callbacks=[fastmask.hf.FastmaskCallback(opt)])
    trainer.train()                                      # or train(resume_from_checkpoint=...)

What the callback does:

- **At the start of training** it checks the Trainer's arguments against the optimizer and raises
  an error naming the argument, before the first step: the optimizer must be a ``MaskedAdamW``
  (the one the Trainer steps) whose parameters are the Trainer's model's (masks and an optimizer
  built for another model are refused). With ``MaskedAdamW(step_in_backward=True)`` (every
  parameter stepped inside ``loss.backward()``, its gradient freed at once) the gradients are gone
  before the Trainer would clip or unscale them: ``max_grad_norm`` must be 0 (the Trainer's default
  is 1.0) and ``fp16=True`` (a GradScaler) is refused; train in ``bf16``, and clip per tensor from
  a post-accumulate-grad hook registered before the optimizer is built if you need clipping (the
  error message shows the four lines).
  ``gradient_accumulation_steps > 1`` works in that mode: the callback keeps the optimizer in
  :meth:`~fastmask.MaskedAdamW.accumulating` from the first micro-batch of each optimizer step to
  the Trainer's ``optimizer.step()``, which then steps the accumulated gradients (bit-identical to
  the step in the backward pass; accumulated gradients exist between micro-batches anyway, so the
  peak memory is the same).
- **At every checkpoint** it writes the optimizer's current masks next to the Trainer's files,
  as ``checkpoint-N/fastmask_masks.safetensors`` (:data:`MASKS_NAME`, the format of
  :meth:`fastmask.MaskSet.save`; :func:`load_masks` reads it back), so a checkpoint says which
  entries its run trains. The Trainer's own ``optimizer.pt`` carries the masks too
  (``mask_indices`` in :meth:`fastmask.MaskedAdamW.state_dict`).

Resuming (``trainer.train(resume_from_checkpoint=...)``) continues bit-identically to an
uninterrupted run with an optimizer rebuilt either with the same masks (e.g.
``masks=fastmask.hf.load_masks(checkpoint)``) or **without** masks: ``MaskedAdamW.load_state_dict``
then adopts the ones saved in ``optimizer.pt``. Gradient (activation) checkpointing
(``TrainingArguments(gradient_checkpointing=True)`` or ``model.gradient_checkpointing_enable()``)
works with both modes and gives the same parameters as training without it.

Tested in one process (CPU). Under DeepSpeed the optimizer is DeepSpeed's own wrapper around
flattened parameters, which a masked optimizer cannot work with: refused at the start. FSDP
through the Trainer is untested (build ``MaskedAdamW`` after ``fully_shard`` for FSDP2, see its
docstring); ``step_in_backward`` is refused by ``MaskedAdamW`` itself under more than one process.

Importing this module imports ``transformers`` (after :func:`fastmask.compat.patch_torchvision`,
which a CPU torch next to a CUDA torchvision wheel needs); ``import fastmask`` alone never does.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

from . import compat as _compat

_compat.patch_torchvision()  # before transformers imports torchvision

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from .masks import Mask, MaskSet  # noqa: E402
from .optim import MaskedAdamW  # noqa: E402

__all__ = ["MASKS_NAME", "FastmaskCallback", "load_masks", "masks_of"]

MASKS_NAME = "fastmask_masks.safetensors"
"""File name of the masks the callback writes into each ``checkpoint-N`` folder."""


def load_masks(checkpoint: str | os.PathLike) -> MaskSet:
    """The masks saved in a Trainer checkpoint folder by :class:`FastmaskCallback`
    (``<checkpoint>/fastmask_masks.safetensors``), e.g. to rebuild the optimizer before resuming."""
    path = os.path.join(os.fspath(checkpoint), MASKS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint: {os.fspath(checkpoint)!r} holds no {MASKS_NAME} (was it written with "
            "fastmask.hf.FastmaskCallback among the Trainer's callbacks?); an optimizer built without masks "
            "adopts the ones saved in its optimizer.pt when the Trainer resumes from it")
    return MaskSet.load(path)


def masks_of(optimizer: MaskedAdamW, model: nn.Module) -> MaskSet:
    """The optimizer's current masks as a :class:`~fastmask.MaskSet` named by ``model``'s parameters."""
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for p, idx in optimizer.masks.items():
        if p not in names:
            raise ValueError(f"optimizer: a masked parameter of shape {tuple(p.shape)} is not a parameter of "
                             f"{type(model).__name__}")
        out[names[p]] = Mask(idx, p.shape)
    return MaskSet(out)


def _unwrap(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    for _ in range(8):  # AcceleratedOptimizer is itself a torch Optimizer subclass
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(optimizer, MaskedAdamW) or inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


_CLIP_HINT = """\
    def clip(p):                                   # clips each gradient once it is complete
        torch.nn.utils.clip_grad_norm_(p, max_norm=1.0)
    for p in targets.parameters():                 # BEFORE MaskedAdamW(...): hooks run in order
        p.register_post_accumulate_grad_hook(clip)"""


class FastmaskCallback(TrainerCallback):
    """Checks a Trainer run with :class:`~fastmask.MaskedAdamW` at its start, drives gradient
    accumulation for ``step_in_backward`` optimizers, and writes the masks into every checkpoint.

    Args:
        optimizer: the ``MaskedAdamW`` also passed as ``Trainer(optimizers=(optimizer, ...))``;
            ``None``: whatever optimizer the Trainer steps (it must be a ``MaskedAdamW``).
        masks: optionally the :class:`~fastmask.MaskSet` the optimizer was built with: at the start
            of training it is checked against the Trainer's model (a MaskSet built for another model
            is refused) and against the optimizer's masks.

    Events (see the module docstring): ``on_train_begin`` checks; ``on_step_begin`` /
    ``on_pre_optimizer_step`` bracket the micro-batches of one optimizer step in
    ``optimizer.accumulating()`` (``step_in_backward`` with ``gradient_accumulation_steps > 1``
    only); ``on_save`` writes ``checkpoint-N/fastmask_masks.safetensors`` (on the process that
    saves, ``args.should_save``).
    """

    def __init__(self, optimizer: MaskedAdamW | None = None, masks: MaskSet | None = None) -> None:
        if optimizer is not None and not isinstance(optimizer, MaskedAdamW):
            raise TypeError(f"optimizer: expected a fastmask.MaskedAdamW (or None: the Trainer's), got "
                            f"{type(optimizer).__module__}.{type(optimizer).__qualname__}")
        if masks is not None and not isinstance(masks, MaskSet):
            raise TypeError(f"masks: expected a fastmask.MaskSet or None, got {type(masks).__name__}")
        self.optimizer = optimizer
        self.masks = masks
        self._accumulate = False  # step_in_backward with gradient_accumulation_steps > 1
        self._stack: contextlib.ExitStack | None = None

    # -- the start of training ----------------------------------------------------------------
    def _resolve(self, trainer_optimizer: Any) -> MaskedAdamW:
        inner = _unwrap(trainer_optimizer) if trainer_optimizer is not None else None
        if self.optimizer is None:
            if not isinstance(inner, MaskedAdamW):
                got = "no optimizer" if inner is None else f"{type(inner).__module__}.{type(inner).__qualname__}"
                raise TypeError(f"optimizer: FastmaskCallback needs the Trainer to step a fastmask.MaskedAdamW "
                                f"(Trainer(optimizers=(MaskedAdamW(...), None))), but it steps {got}")
            return inner
        if inner is not None and inner is not self.optimizer:
            raise ValueError(
                "optimizer: the Trainer steps another optimizer than the one given to FastmaskCallback "
                f"({type(inner).__qualname__}); pass the same MaskedAdamW to both: "
                "Trainer(..., optimizers=(opt, None), callbacks=[FastmaskCallback(opt)])")
        return self.optimizer

    @staticmethod
    def _check_args(args: Any, opt: MaskedAdamW) -> None:
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None):
            raise NotImplementedError(
                "deepspeed: DeepSpeed replaces the optimizer's parameters by flattened partitions, which a "
                "MaskedAdamW (masks and compact state per parameter) cannot work with; train without DeepSpeed")
        if not getattr(opt, "step_in_backward", False):
            return
        max_grad_norm = getattr(args, "max_grad_norm", None)
        if max_grad_norm is not None and max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm: got {max_grad_norm} (the Trainer's default is 1.0), but the optimizer was built "
                "with step_in_backward=True: every gradient is stepped and freed inside loss.backward(), so the "
                "Trainer's global gradient-norm clipping would find no gradient and silently clip nothing. Set "
                "TrainingArguments(max_grad_norm=0) (the logged grad_norm then reads 0 without gradient accumulation). "
                "To clip, clip each tensor on its own, from a post-accumulate-grad hook registered before the "
                "optimizer is built (with gradient accumulation it clips the running sum after each micro-batch):\n"
                f"{_CLIP_HINT}\n"
                "or build the optimizer with step_in_backward=False to keep the Trainer's global clipping.")
        if getattr(args, "fp16", False):
            raise ValueError(
                "fp16: fp16=True trains with a GradScaler, whose inf/NaN check would come after the optimizer "
                "stepped inside loss.backward() (step_in_backward=True). Use bf16=True (autocast without a "
                "scaler), or build the optimizer with step_in_backward=False (MaskedAdamW supports GradScaler).")

    def _check_model(self, model: nn.Module | None, opt: MaskedAdamW) -> None:
        if model is None:
            return
        params = {p: n for n, p in model.named_parameters()}
        names = getattr(opt, "_names", {})
        for gi, group in enumerate(opt.param_groups):
            for i, p in enumerate(group["params"]):
                if p not in params:
                    what = (repr(names[p]) if p in names else f"param_groups[{gi}]['params'][{i}]") + \
                        f" (shape {tuple(p.shape)})"
                    raise ValueError(
                        f"optimizer: parameter {what} is not a parameter of the model the Trainer trains "
                        f"({type(model).__name__}): was the optimizer (or its masks) built for another model? "
                        "Build the MaskedAdamW from the Trainer's model: MaskedAdamW(targets.parameters(), ..., "
                        "masks=masks, model=model) with targets = fastmask.find_targets(model, ...)")
        if self.masks is not None:
            try:
                self.masks.validate(model)
            except (KeyError, ValueError) as exc:
                msg = exc.args[0] if exc.args else str(exc)
                raise ValueError(f"masks: {msg}") from None
            have = masks_of(opt, model)
            if have != self.masks:
                only_given = sorted(set(self.masks) - set(have))
                only_opt = sorted(set(have) - set(self.masks))
                differ = sorted(n for n in set(have) & set(self.masks) if have[n] != self.masks[n])
                parts = [f"{label}: {ns[:3]}{' ...' if len(ns) > 3 else ''}" for label, ns in (
                    ("masked only in masks=", only_given), ("masked only by the optimizer", only_opt),
                    ("other entries selected", differ)) if ns]
                raise ValueError("masks: the optimizer holds other masks than the MaskSet given to "
                                 f"FastmaskCallback ({'; '.join(parts)})")
        stepped = {p for g in opt.param_groups for p in g["params"]}
        idle = [n for p, n in params.items() if p.requires_grad and p not in stepped]
        if idle:
            warnings.warn(
                f"FastmaskCallback: {len(idle)} trainable parameters of the model are not in the optimizer "
                f"(e.g. {idle[:3]}): they get gradients every step but are never updated. "
                "fastmask.freeze(model, targets) sets requires_grad=False on everything but the targets.",
                stacklevel=2)
        if not opt.masks:
            warnings.warn("FastmaskCallback: the optimizer has no masks, so every parameter it holds is updated "
                          "densely (an optimizer built without masks adopts them only when the Trainer resumes "
                          "from a checkpoint whose optimizer.pt has them)", stacklevel=2)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._close()  # a run that raised mid-step may have left the optimizer accumulating
        opt = self._resolve(optimizer)
        self._check_args(args, opt)
        self._check_model(model, opt)
        self._opt = opt
        self._accumulate = bool(getattr(opt, "step_in_backward", False)) and args.gradient_accumulation_steps > 1

    # -- gradient accumulation with step_in_backward --------------------------------------------
    def _close(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def on_step_begin(self, args, state, control, **kwargs):
        # The Trainer calls this before the first micro-batch of each optimizer step; the micro-batches
        # then accumulate until on_pre_optimizer_step, after which the Trainer calls optimizer.step().
        if self._accumulate and self._stack is None:
            stack = contextlib.ExitStack()
            stack.enter_context(self._opt.accumulating())
            self._stack = stack

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._close()

    def on_step_end(self, args, state, control, **kwargs):
        self._close()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._close()

    def on_train_end(self, args, state, control, **kwargs):
        self._close()

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not args.should_save or model is None:
            return
        opt = getattr(self, "_opt", None) or self._resolve(optimizer)
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(f"FastmaskCallback: no checkpoint folder {folder!r} to write {MASKS_NAME} into (a "
                          "hyper-parameter search run?); the masks are still in the checkpoint's optimizer.pt",
                          stacklevel=2)
            return
        masks_of(opt, model).save(os.path.join(folder, MASKS_NAME), metadata={
            "written_by": "fastmask.hf.FastmaskCallback", "global_step": str(state.global_step)})
