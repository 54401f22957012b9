"""Small validation helpers shared by masks, ops and the optimizer.

Every check raises with the name of the offending argument or parameter, so a user reading the
error knows what to fix; none of them writes to a tensor.
"""
from __future__ import annotations

import torch

INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def check_indices(idx: torch.Tensor, numel: int, what: str) -> None:
    """Check that ``idx`` is a 1-D integer tensor of strictly increasing values in ``[0, numel)``.

    Reads the index values (one pass; a host sync for device tensors): call it where indices enter
    the system, not on every optimizer step.
    """
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor of flat indices, got {type(idx).__name__}")
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"{what}: indices must have an integer dtype, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{what}: indices must be 1-D flat indices, got shape {tuple(idx.shape)}")
    if idx.numel() == 0 or idx.device.type == "meta":
        return  # meta tensors have no values to check (deferred init); their real copies are checked
    lo, hi = idx.min().item(), idx.max().item()
    if lo < 0 or hi >= numel:
        raise IndexError(
            f"{what}: index out of range: indices span [{lo}, {hi}] but the tensor has {numel} entries"
        )
    if idx.numel() > 1:
        steps = idx[1:].long() - idx[:-1].long()
        if not bool((steps > 0).all()):
            bad = int((steps <= 0).nonzero()[0, 0])
            raise ValueError(
                f"{what}: indices must be sorted and unique; idx[{bad}]={int(idx[bad])} is followed "
                f"by idx[{bad + 1}]={int(idx[bad + 1])}"
            )


def check_segments(idx: torch.Tensor, offsets: list[int], numels: list[int], what: str) -> None:
    """Check every segment ``idx[offsets[t]:offsets[t+1]]`` against tensor ``t``'s numel."""
    for t, n in enumerate(numels):
        check_indices(idx[offsets[t] : offsets[t + 1]], n, f"{what} (segment of tensor {t})")
