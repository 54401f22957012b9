"""Triton kernel for ``fastmask::score_accumulate_``: add every gradient entry's statistic to its
fp32 score tensor, for all tensors of a call in one launch.

Maths (fp32 whatever the gradient dtype), per entry ``i`` of tensor ``t``::

    scores[t][i] += g          (mode "grad": signed; the paper's score is |sum g|, taken later)
    scores[t][i] += |g|        (mode "abs")
    scores[t][i] += g * g      (mode "fisher": empirical Fisher)

with ``g = float32(grads[t][i])``, the sum and the square rounded on their own as the reference's
``score.add_(g * g)`` (the launch disables Triton's FMA contraction). Programs tile the tensors in
blocks of ``BLOCK`` entries; a program finds its tensor through the block-start row of the
per-tensor table. A program with a whole block loads and stores it without masks, and the data
pointers (read from the table) are hinted 16-byte aligned when the host saw them all aligned, so
the compiled kernel uses vector accesses.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    BLOCK_START, NUMEL, PTR_A, PTR_B, SCORE_MODE_IDS, TABLE_ROWS, TL_DTYPES, TableCache, accumulate_scores,
    aligned16, dense_block, find_block, launch_context, num_warps_for, pad_tensors, table_ptr_of,
)

_tables = TableCache()


@triton.jit
def _score_accumulate_kernel(
    table_ptr, n_tensors,
    G_DTYPE: tl.constexpr, SCORE_MODE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    T_PAD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t, first = find_block(table_ptr + BLOCK_START * n_tensors, n_tensors, pid, T_PAD)
    sc_ptr = table_ptr_of(table_ptr, PTR_A, n_tensors, t, tl.float32, ALIGNED)
    g_ptr = table_ptr_of(table_ptr, PTR_B, n_tensors, t, G_DTYPE, ALIGNED)
    numel = tl.load(table_ptr + NUMEL * n_tensors + t)
    start = (pid - first) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:  # a whole block: no masks, so aligned tensors get vector accesses
        accumulate_scores(g_ptr, sc_ptr, offs, None, 1.0, False, SCORE_MODE)
    else:
        accumulate_scores(g_ptr, sc_ptr, offs, offs < numel, 1.0, False, SCORE_MODE)


def score_accumulate_(scores, grads, score_mode) -> None:
    """One launch per (device, gradient dtype) present: normally exactly one."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for t, g in enumerate(grads):
        if g.dtype not in TL_DTYPES:
            raise TypeError(f"grads[{t}]: the triton backend scores {tuple(TL_DTYPES)} gradients, got {g.dtype}")
        if g.numel():
            groups.setdefault((g.device, g.dtype), []).append(t)
    for (device, dtype), members in groups.items():
        block = dense_block(device)
        starts, total = [], 0
        for t in members:
            starts.append(total)
            total += triton.cdiv(grads[t].numel(), block)
        rows = [[0] * len(members) for _ in range(TABLE_ROWS)]
        rows[BLOCK_START.value] = starts
        rows[PTR_A.value] = [scores[t].data_ptr() for t in members]
        rows[PTR_B.value] = [grads[t].data_ptr() for t in members]
        rows[NUMEL.value] = [grads[t].numel() for t in members]
        with launch_context(device):
            table = _tables.get(rows, device)
            _score_accumulate_kernel[(total,)](
                table, len(members),
                G_DTYPE=TL_DTYPES[dtype], SCORE_MODE=SCORE_MODE_IDS[score_mode],
                ALIGNED=aligned16(rows[PTR_A.value] + rows[PTR_B.value]), BLOCK=block,
                T_PAD=pad_tensors(len(members)), num_warps=num_warps_for(block), enable_fp_fusion=False,
            )
