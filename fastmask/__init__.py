"""fastmask: fast, exact selective parameter updates for foundation models (SPU, CVPR 2024).

    targets = fastmask.find_targets(model)               # which tensors (the preset that fits)
    scores = fastmask.score(model, batches, loss_fn)     # accumulated gradient scores
    masks = fastmask.select(scores, density=0.1)         # top-10% entries per tensor
    opt = fastmask.optim.MaskedAdamW(targets.parameters(), lr=1e-5, masks=masks, model=model)

Distributed (torch.distributed; fastmask.distributed): all_reduce_scores before select, mask
agreement checked by MaskedAdamW, masked_allreduce_hook for DDP.

Sparse deltas (fastmask.delta): export what training changed as (indices, XOR bits) per masked
tensor, apply/revert it bit-exactly, refusing other base weights; ``fastmask delta`` on the CLI.

Large models: ``MaskedAdamW(..., step_in_backward=True)`` steps each parameter inside backward()
and frees its gradient; ``fastmask.sampled_weight_grads(model, opt)`` computes masked linear
layers' weight gradients at the selected entries only; ``fastmask.hf.FastmaskCallback`` for the
Hugging Face Trainer.
"""
from . import backends, delta, distributed, grads, ops, optim
from ._version import __version__
from .grads import sampled_weight_grads
from .masks import Mask, MaskSet, num_selected, select
from .optim import MaskedAdamW
from .scoring import score
from .targets import PRESETS, Preset, Targets, find_targets, freeze

__all__ = [
    "__version__", "backends", "delta", "distributed", "grads", "ops", "optim", "Mask", "MaskSet", "MaskedAdamW",
    "num_selected", "select", "score", "sampled_weight_grads", "PRESETS", "Preset", "Targets", "find_targets",
    "freeze",
]
