"""Triton kernel for ``fastmask::sampled_weight_grad``: a linear layer's weight gradient at
selected entries only.

Maths, per selected entry ``j`` with ``idx[j] = r * n_in + c``::

    out[j] = sum_t float32(grad_out[t, r]) * float32(input[t, c])      (t < T)

accumulated in float32 (on a GPU each product is fused into its sum, one rounding per term; the
order is the kernel's, so the result agrees with the dense product to rounding, not bit for bit).

Each program takes ``BLOCK_K`` consecutive entries of ``idx`` and walks the tokens in tiles of
``BLOCK_T``: a ``[BLOCK_T, BLOCK_K]`` tile of products per iteration, summed over the tokens at the
end. Entries are the fastest-varying axis of the tile: masks are sorted, so neighbouring entries
mostly share their row ``r`` (one ``grad_out`` load serves them) and their columns fall in one row
of ``input`` (a few cache lines per token). Both operands are read through their strides, so
neither is transposed or copied.

Indices outside ``[0, out * in)`` read nothing and give 0; the program adds them to a counter, and
the host raises ``IndexError`` (CPU, the interpreter) or asserts on the device without a host sync
(``torch._assert_async``, GPU), as the reference does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import launch_context


@triton.jit
def _sampled_grad_kernel(
    go_ptr, x_ptr, idx_ptr, out_ptr, err_ptr,
    T, n_in, numel, k,
    s_go_t, s_go_o, s_x_t, s_x_i,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    j = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    live = j < k
    q = tl.load(idx_ptr + j, mask=live, other=0).to(tl.int64)
    ok = live & (q >= 0) & (q < numel)
    n_bad = tl.sum((live & ~ok).to(tl.int32), axis=0)
    if n_bad > 0:
        tl.atomic_add(err_ptr, n_bad)
    q = tl.where(ok, q, 0)
    r = q // n_in
    c = q - r * n_in
    ts = tl.arange(0, BLOCK_T).to(tl.int64)
    # 64-bit offsets: T * n_out can pass 2**31 for long sequences.
    a_ptrs = go_ptr + ts[:, None] * s_go_t + (r * s_go_o)[None, :]
    b_ptrs = x_ptr + ts[:, None] * s_x_t + (c * s_x_i)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        m = ((ts + t0) < T)[:, None] & ok[None, :]
        a = tl.load(a_ptrs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptrs, mask=m, other=0.0).to(tl.float32)
        acc += a * b
        a_ptrs += BLOCK_T * s_go_t
        b_ptrs += BLOCK_T * s_x_t
    tl.store(out_ptr + j, tl.sum(acc, axis=0), mask=live)


def _blocks(device: torch.device, T: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_T, num_warps). On a GPU 64 entries x 32 tokens per iteration (8 fp32
    accumulators per thread at 4 warps); the interpreter pays per program and per iteration, not
    per element, so it gets large tiles."""
    if device.type == "cpu":
        return 512, min(256, max(16, triton.next_power_of_2(max(T, 1)))), 4
    return 64, 32, 4


def sampled_weight_grad(grad_out: torch.Tensor, input: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """One launch (arguments already checked by fastmask.ops; ``idx`` contiguous int32)."""
    T, n_out = grad_out.shape
    n_in = input.shape[1]
    k = idx.numel()
    device = grad_out.device
    out = torch.empty(k, dtype=torch.float32, device=device)
    if k == 0:
        return out
    numel = n_out * n_in
    err = torch.zeros(1, dtype=torch.int32, device=device)
    block_k, block_t, warps = _blocks(device, T)
    with launch_context(device):
        _sampled_grad_kernel[(triton.cdiv(k, block_k),)](
            grad_out, input, idx, out, err, T, n_in, numel, k,
            grad_out.stride(0), grad_out.stride(1), input.stride(0), input.stride(1),
            BLOCK_K=block_k, BLOCK_T=block_t, num_warps=warps,
        )
    shape = f"for a weight of shape [{n_out}, {n_in}]"
    if device.type == "cpu":  # the interpreter: the count is already on the host
        bad = int(err.item())
        if bad:
            q = idx.long()
            first = int(q[(q < 0) | (q >= numel)][0])
            raise IndexError(f"idx: {bad} {'index is' if bad == 1 else 'indices are'} outside [0, {numel}) {shape}; "
                             f"the first is {first}")
    else:  # checked on the device, in stream order: no host sync in a backward pass
        torch._assert_async(err.eq(0).all(), f"idx: an index is outside [0, {numel}) {shape}")
    return out
