"""Weight gradients of masked linear layers at their selected entries only.

Autograd computes a linear layer's whole weight gradient, ``grad_out.T @ input`` (``out * in * T``
multiply-adds for ``T`` tokens), although :class:`~fastmask.MaskedAdamW` reads only the selected
entries: at 1% density, 99% of that matrix product is thrown away. For a language model's MLP it is
a large part of the backward pass, and what makes a masked fine-tune slower than LoRA, which never
computes its frozen weights' gradients.

:func:`sampled_weight_grads` makes every ``nn.Linear`` (and Hugging Face ``Conv1D``, GPT-2's layer
with a transposed weight) whose weight the optimizer masks compute its weight gradient at the
selected entries only (:func:`fastmask.ops.sampled_weight_grad`: ``K * T`` multiply-adds), as a
full-shape gradient that is zero elsewhere; the input and bias gradients are computed as the layer
computes them::

    opt = fastmask.MaskedAdamW(targets.parameters(), lr=1e-4, masks=masks, model=model, step_in_backward=True)
    with fastmask.sampled_weight_grads(model, opt):    # or: handle = ...; handle.remove()
        for batch in loader:
            loss_fn(model, batch).backward()

The selected entries get the same gradient as autograd's, summed in float32 in another order
(agreement to rounding, not bit for bit); the optimizer never reads the others, so unselected
entries stay bit-exact as before. It pays where the mask is sparse (the CPU kernel computes each
entry as a dot product over the tokens; the dense product is a fast matrix multiply): at 1% the
weight gradient costs a quarter of the dense product's time on a CPU, at 10% about as much
(``bench/RESULTS.md``). On a GPU the extension computes the product with cuBLAS in row chunks of
at most 16 MiB and gathers the selected entries, so the whole weight gradient never exists (a
Triton kernel computing the dot products directly is the other CUDA backend). The masks are read from the optimizer at every forward pass, so ``set_masks`` takes effect
at once. :func:`fastmask.score` needs whole gradients: it computes them while it runs (see
:func:`dense_weight_grads`). An optimizer with ``track_scores`` (which reads every entry) is
refused.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import types
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from . import ops

__all__ = ["sampled_weight_grads", "SampledWeightGrads", "dense_weight_grads"]

logger = logging.getLogger(__name__)

_dense = contextvars.ContextVar("fastmask_dense_weight_grads", default=False)


@contextlib.contextmanager
def dense_weight_grads() -> Iterator[None]:
    """Inside this context, layers under :func:`sampled_weight_grads` compute whole weight
    gradients again (forward passes run inside it decide). :func:`fastmask.score` uses it."""
    token = _dense.set(True)
    try:
        yield
    finally:
        _dense.reset(token)


class _SampledLinear(torch.autograd.Function):
    """``F.linear`` whose weight gradient is computed at ``idx`` only (zero elsewhere)."""

    @staticmethod
    def forward(ctx, x, weight, bias, idx):
        ctx.save_for_backward(x, weight, idx)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight, idx = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = gy.matmul(weight.to(gy.dtype)).to(x.dtype)  # as autocast's cast would route it back
        if ctx.needs_input_grad[1]:
            g2 = gy.reshape(-1, gy.shape[-1])
            vals = ops.sampled_weight_grad(g2, x.reshape(-1, x.shape[-1]).to(g2.dtype), idx)
            gw = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
            gw.view(-1).index_copy_(0, idx.long(), vals.to(weight.dtype))
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return gx, gw, gb, None


class _SampledConv1D(torch.autograd.Function):
    """Hugging Face's ``Conv1D`` (GPT-2: ``x @ weight + bias``, weight stored ``[in, out]``) whose
    weight gradient ``input.T @ grad_out`` is computed at ``idx`` only (flat positions in the stored
    ``[in, out]`` layout, as masks of that weight hold them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, idx):
        ctx.save_for_backward(x, weight, idx)
        ctx.bias_dtype = bias.dtype
        out = torch.addmm(bias, x.view(-1, x.size(-1)), weight)  # exactly Conv1D.forward
        return out.view(x.size()[:-1] + (weight.shape[1],))

    @staticmethod
    def backward(ctx, gy):
        x, weight, idx = ctx.saved_tensors
        gx = gw = gb = None
        g2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = g2.mm(weight.to(g2.dtype).t()).view(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            vals = ops.sampled_weight_grad(x.reshape(-1, x.shape[-1]).to(g2.dtype), g2, idx)
            gw = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
            gw.view(-1).index_copy_(0, idx.long(), vals.to(weight.dtype))
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(ctx.bias_dtype)
        return gx, gw, gb, None


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"
            and isinstance(getattr(module, "bias", None), torch.Tensor) and module.weight.dim() == 2)


class SampledWeightGrads:
    """What :func:`sampled_weight_grads` patched; :meth:`remove` (or leaving the ``with`` block)
    restores the layers. ``layers``: the patched module names; ``skipped``: masked parameters that
    are not the weight of an ``nn.Linear`` or a Hugging Face ``Conv1D`` (they keep whole gradients)."""

    def __init__(self, model: nn.Module, optimizer) -> None:
        from .optim import MaskedAdamW

        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, MaskedAdamW):
            raise TypeError(f"optimizer: expected a fastmask.MaskedAdamW, got {type(optimizer).__name__}")
        if optimizer.track_scores:
            raise ValueError("optimizer: it tracks scores (track_scores=...), which needs every entry's gradient; "
                             "sampled weight gradients compute the selected entries only")
        masked = optimizer.masks
        self._opt = weakref.ref(optimizer)
        self._patched: list[tuple[nn.Module, object]] = []
        self.layers: list[str] = []
        covered = set()
        for name, module in model.named_modules():
            # exact types: a subclass may compute otherwise
            if (type(module) is nn.Linear or _is_hf_conv1d(module)) and module.weight in masked:
                covered.add(module.weight)
                self.layers.append(name)
                self._patched.append((module, module.__dict__.get("forward")))
        names = {p: n for n, p in model.named_parameters()}
        self.skipped = [names.get(p, f"a parameter of shape {tuple(p.shape)}") for p in masked if p not in covered]
        if not self.layers:
            raise ValueError("model: none of its nn.Linear (or Hugging Face Conv1D) layers has a weight masked by "
                             f"the optimizer ({len(masked)} masked parameters, none such a weight of this model)")
        if self.skipped:
            logger.info("sampled_weight_grads: %d masked parameters are not nn.Linear/Conv1D weights and keep whole "
                        "gradients: %s", len(self.skipped), ", ".join(self.skipped[:5]))
        for module, _ in self._patched:
            module.forward = types.MethodType(_make_forward(self, _is_hf_conv1d(module)), module)

    def _idx(self, weight: torch.Tensor) -> torch.Tensor | None:
        opt = self._opt()
        return None if opt is None else opt._mask_of.get(weight)

    def remove(self) -> None:
        for module, previous in self._patched:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._patched = []

    def __enter__(self) -> SampledWeightGrads:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"SampledWeightGrads({len(self.layers)} linear layers, {len(self.skipped)} masked parameters skipped)"


def _make_forward(handle: SampledWeightGrads, conv1d: bool):
    fn = _SampledConv1D if conv1d else _SampledLinear

    def forward(module: nn.Module, input: torch.Tensor) -> torch.Tensor:
        idx = handle._idx(module.weight)
        if idx is None or _dense.get() or not (torch.is_grad_enabled() and module.weight.requires_grad):
            return type(module).forward(module, input)  # the layer's own forward
        return fn.apply(input, module.weight, module.bias, idx)

    return forward


def sampled_weight_grads(model: nn.Module, optimizer) -> SampledWeightGrads:
    """Make each ``nn.Linear`` of ``model`` whose weight ``optimizer`` (a :class:`~fastmask.MaskedAdamW`)
    masks compute its weight gradient at the selected entries only (see the module docstring).
    Returns a handle; use it as a context manager or call ``remove()``."""
    return SampledWeightGrads(model, optimizer)
