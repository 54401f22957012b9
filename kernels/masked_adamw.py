"""Triton kernel for ``fastmask::masked_adamw_step_``: AdamW on the selected entries of all tensors
of a call in one launch, optionally accumulating every entry's score in the same pass.

Maths (fp32 whatever the param dtype; ``s`` the tensor's step, already incremented)::

    g  = grad[i] / grad_scale                 (if given);   score[i] += stat(g)   (every i)
    g  = -g                                   (if maximize)
    p  = param[i] * (1 - lr * weight_decay)
    m  = lerp(m, g, 1 - beta1)
    v  = beta2 * v + (1 - beta2) * g * g
    v' = max(v_max, v)                        (amsgrad; else v' = v)
    param[i] = p + (-lr / (1 - beta1**s)) * m / (sqrt(v') / sqrt(1 - beta2**s) + eps)

for each selected flat position ``i = idx[j]`` (``j`` in the tensor's compact segment); nothing at
all changes when ``found_inf`` is non-zero.

Rounding: exactly the reference's (``fastmask.reference``, i.e. ``torch.optim.AdamW``'s order of
operations) and ``csrc/adamw_math.h``'s, so the optimizer state equals the reference's bit for bit:

* scalars that depend only on hyper-parameters (``1 - beta1``, ``beta2``, ``1 - beta2``, ``eps``)
  are computed on the host in float64 and rounded to fp32 once; the per-tensor ones
  (``-lr / (1 - beta1**s)``, ``sqrt(1 - beta2**s)``, ``1 - lr * weight_decay``) in float64 in the
  kernel, from the step count (and lr) on the device, rounded to fp32 once. float64 scalars reach
  the kernel as int64 bits (Triton passes Python floats as fp32);
* per entry everything is fp32, with FMAs exactly where torch's kernels have them (lerp; addcmul,
  whose rounding differs between torch's CPU and CUDA kernels: ``_utils.addcmul_torch``), every
  other product and sum rounded on its own (the launch disables Triton's FMA contraction), IEEE
  sqrt and division, and ``torch.maximum``'s NaN propagation for amsgrad.

Grid. Without scores, programs tile the compact arrays: tensor ``t`` owns ``cdiv(k_t + seg_lo %
COMPACT_ALIGN, BLOCK)`` programs, each stepping ``BLOCK`` consecutive compact entries (a gather from
the param/grad), from the segment's start rounded down to ``COMPACT_ALIGN`` (4) entries: a program
wholly inside its segment then starts 16 bytes aligned and runs without masks on the compact
arrays (vector loads and stores); only a tensor's first and last programs are masked.
With scores, programs tile the *dense* tensors instead: each program reads one dense block of the
gradient to update the scores (unmasked, vector accesses where the pointers are aligned, for a
whole block), then steps the selected entries falling inside that block, so their gradient is
re-read from cache, not from memory: one pass over the gradient serves both. Where each program's
entries start in the sorted index segment is bisected once per mask on the device
(``_block_ranges_kernel``, cached per index buffer version and layout in ``_ranges``), so a program
finds its range with two loads.

Index safety. ``fastmask.ops`` checks index contents only when an index buffer's version changes,
and this function can be called directly, so the kernel checks every index it uses: an entry
outside ``[0, numel)`` of its tensor is dropped from the masks of every access at its index (its
param and grad are never read, param never written) and its state is left as it was (a program
without masks writes the entry's own state back, bit for bit); it is counted per tensor in a small
int32 error tensor (``tl.atomic_add`` on the bad lanes only). After the launch, on the CPU
(interpreter) a non-zero count raises ``IndexError``; on a GPU ``torch._assert_async`` checks it on
the device, without a host sync. In the fused variant, a tensor's first program also takes the
entries sorted before index 0 and its last those sorted after the end, and each program clamps its
cached range to its tensor's segment: the programs of a tensor split its segment exactly, whatever
the cached ranges and the index contents are (even written behind fastmask's back, sorted or
not), so every entry is visited once, out-of-range ones counted, nothing read or written outside
the tensors. (Stale ranges only cost locality: entries are stepped alike by any program.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    BLOCK_START, COMPACT_ALIGN, NUMEL, PTR_A, PTR_B, PTR_C, SCORE_MODE_IDS, SEG_HI, SEG_LO, TABLE_ROWS, TL_DTYPES,
    DerivedCache, TableCache, accumulate_scores, addcmul_torch, aligned16, as_f32, as_f64, dense_block, f32_bits,
    f64_bits, find_block, launch_context, lerp_torch, lower_bound, maximum_torch, num_warps_for, pad_tensors,
    pow_f64, table_ptr_of, to_param_dtype,
)

_tables = TableCache()
#: The fused step's per-program ranges, per index buffer and layout (see ``_fused_ranges``).
_ranges = DerivedCache()


@triton.jit
def _step_entries(
    j, live, idx_ptr, p_ptr, g_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, numel, err_ptr,
    decay, neg_step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, scale,
    P_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
    CUDA_ROUNDING: tl.constexpr,
):
    """Step the compact entries ``j`` where ``live``; ``live=None``: every lane is an entry, and
    the accesses at ``j`` (contiguous) take no mask, so that they compile to vector loads/stores."""
    # Entries whose index is outside [0, numel) take no part: counted in err_ptr (this tensor's
    # slot; an atomic on those lanes only, none for valid input), masked out of every access at
    # their index, their state left as it was.
    if live is None:
        i = tl.load(idx_ptr + j)
        in_range = (i >= 0) & (i < numel)
        mask = in_range
        bad = in_range == 0
    else:
        i = tl.load(idx_ptr + j, mask=live, other=0)
        in_range = (i >= 0) & (i < numel)
        mask = live & in_range
        bad = live & (in_range == 0)
    tl.atomic_add(err_ptr + tl.zeros_like(j), 1, mask=bad, sem="relaxed")
    p_raw = tl.load(p_ptr + i, mask=mask)
    g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, scale)
    if MAXIMIZE:
        g = -g
    p = p_raw.to(tl.float32) * decay
    if live is None:
        # Unmasked: the state of an out-of-range entry is read too, and written back unchanged
        # (same bits) below, so that no store needs a per-lane mask either.
        m0 = tl.load(exp_avg_ptr + j)
        v0 = tl.load(exp_avg_sq_ptr + j)
    else:
        m0 = tl.load(exp_avg_ptr + j, mask=mask, other=0.0)
        v0 = tl.load(exp_avg_sq_ptr + j, mask=mask, other=0.0)
    m = lerp_torch(m0, g, one_minus_beta1)
    v = addcmul_torch(v0 * beta2, g, one_minus_beta2, CUDA_ROUNDING)
    if AMSGRAD:
        if live is None:
            vm0 = tl.load(max_exp_avg_sq_ptr + j)
            v_max = maximum_torch(vm0, v)
            tl.store(max_exp_avg_sq_ptr + j, tl.where(in_range, v_max, vm0))
        else:
            v_max = maximum_torch(tl.load(max_exp_avg_sq_ptr + j, mask=mask, other=0.0), v)
            tl.store(max_exp_avg_sq_ptr + j, v_max, mask=mask)
        v_hat = v_max
    else:
        v_hat = v
    # IEEE-rounded sqrt/div (Triton's defaults are approximate on GPUs), as torch's kernels.
    denom = tl.div_rn(tl.sqrt_rn(v_hat), bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)
    if live is None:
        tl.store(exp_avg_ptr + j, tl.where(in_range, m, m0))
        tl.store(exp_avg_sq_ptr + j, tl.where(in_range, v, v0))
    else:
        tl.store(exp_avg_ptr + j, m, mask=mask)
        tl.store(exp_avg_sq_ptr + j, v, mask=mask)
    tl.store(p_ptr + i, to_param_dtype(p, P_DTYPE), mask=mask)


@triton.jit(do_not_specialize=["lr_bits", "beta1_bits", "beta2_bits", "wd_bits", "omb1_bits", "b2_bits",
                               "omb2_bits", "eps_bits"])
def _masked_adamw_kernel(
    table_ptr, n_tensors, idx_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, steps_ptr, err_ptr,
    lr_bits, lr_ptr, beta1_bits, beta2_bits, wd_bits, omb1_bits, b2_bits, omb2_bits, eps_bits,
    grad_scale_ptr, found_inf_ptr, ranges_ptr,
    P_DTYPE: tl.constexpr, LR_ON_DEVICE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, FUSED_SCORES: tl.constexpr, SCORE_MODE: tl.constexpr,
    CUDA_ROUNDING: tl.constexpr, DENSE_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, SBLOCK: tl.constexpr,
    T_PAD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t, first = find_block(table_ptr + BLOCK_START * n_tensors, n_tensors, pid, T_PAD)
    b = pid - first
    p_ptr = tl.load(table_ptr + PTR_A * n_tensors + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = table_ptr_of(table_ptr, PTR_B, n_tensors, t, P_DTYPE, DENSE_ALIGNED)
    seg_lo = tl.load(table_ptr + SEG_LO * n_tensors + t)
    seg_hi = tl.load(table_ptr + SEG_HI * n_tensors + t)
    numel = tl.load(table_ptr + NUMEL * n_tensors + t)
    err_ptr = err_ptr + t

    # A skipped step (GradScaler found inf/nan) empties this program's ranges: no memory traffic,
    # no host sync.
    if HAS_INF:
        live = tl.load(found_inf_ptr) == 0
        seg_hi = tl.where(live, seg_hi, seg_lo)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(grad_scale_ptr).to(tl.float32)

    # Per-tensor scalars in float64, rounded to fp32 once (fastmask.reference, make_tensor_scalars
    # in csrc/adamw_math.h): -lr / (1 - beta1**s), sqrt(1 - beta2**s), 1 - lr * weight_decay.
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = as_f64(lr_bits)
    s = tl.load(steps_ptr + t).to(tl.float64)
    bias_correction1 = 1.0 - pow_f64(as_f64(beta1_bits), s)
    bias_correction2 = 1.0 - pow_f64(as_f64(beta2_bits), s)
    neg_step_size = (-lr / bias_correction1).to(tl.float32)
    bc2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
    decay = (1.0 - lr * as_f64(wd_bits)).to(tl.float32)
    # Hyper-parameter scalars, rounded to fp32 on the host.
    one_minus_beta1 = as_f32(omb1_bits)
    beta2 = as_f32(b2_bits)
    one_minus_beta2 = as_f32(omb2_bits)
    eps = as_f32(eps_bits)

    if FUSED_SCORES:
        sc_ptr = table_ptr_of(table_ptr, PTR_C, n_tensors, t, tl.float32, DENSE_ALIGNED)
        start = b * BLOCK
        end = tl.minimum(start + BLOCK, numel)
        if HAS_INF:
            end = tl.where(live, end, start)
        offs = start + tl.arange(0, BLOCK)
        if end - start == BLOCK:  # a whole block: no masks (vector accesses where aligned)
            accumulate_scores(g_ptr, sc_ptr, offs, None, scale, HAS_SCALE, SCORE_MODE)
        else:
            accumulate_scores(g_ptr, sc_ptr, offs, offs < end, scale, HAS_SCALE, SCORE_MODE)
        # The selected entries inside [start, start + BLOCK): [ranges[pid], ranges[pid + 1]),
        # bisected once per mask (``_fused_ranges``). The tensor's first program starts at seg_lo
        # and its last ends at seg_hi, so that out-of-range entries (sorted: negative ones first,
        # those >= numel last) are visited and counted rather than passed over. Whatever the
        # ranges hold (a stale cache: idx written behind fastmask's back), the clamps keep every
        # program inside its tensor's segment, and since both neighbours clamp ranges[pid + 1]
        # the same way, the programs of a tensor still split its segment: each entry visited once.
        last = start + BLOCK >= numel
        j0 = tl.load(ranges_ptr + pid)
        j1 = tl.load(ranges_ptr + tl.where(last, pid, pid + 1))  # (pid + 1 < grid when not last)
        j0 = tl.where(b == 0, seg_lo, tl.minimum(tl.maximum(j0, seg_lo), seg_hi))
        j1 = tl.where(last, seg_hi, tl.minimum(tl.maximum(j1, seg_lo), seg_hi))  # (j1 < j0: no entries)
        for j_start in range(j0, j1, SBLOCK):
            j = j_start + tl.arange(0, SBLOCK)
            _step_entries(j, j < j1, idx_ptr, p_ptr, g_ptr, exp_avg_ptr, exp_avg_sq_ptr,
                          max_exp_avg_sq_ptr, numel, err_ptr, decay, neg_step_size, bc2_sqrt, one_minus_beta1,
                          beta2, one_minus_beta2, eps, scale, P_DTYPE, AMSGRAD, MAXIMIZE, HAS_SCALE,
                          CUDA_ROUNDING)
    else:
        # Programs tile the segment from seg_lo rounded down to COMPACT_ALIGN entries, so that each
        # program's first compact entry is 16-byte aligned (for aligned idx/state tensors, which
        # Triton specializes on); a program wholly inside the segment then runs without masks on
        # its contiguous accesses: vector loads and stores. Only a tensor's first and last
        # programs take the masked path.
        base = tl.multiple_of((seg_lo // COMPACT_ALIGN) * COMPACT_ALIGN + b * BLOCK, COMPACT_ALIGN)
        j = base + tl.arange(0, BLOCK)
        if (base >= seg_lo) & (base + BLOCK <= seg_hi):
            _step_entries(j, None, idx_ptr, p_ptr, g_ptr, exp_avg_ptr, exp_avg_sq_ptr,
                          max_exp_avg_sq_ptr, numel, err_ptr, decay, neg_step_size, bc2_sqrt, one_minus_beta1, beta2,
                          one_minus_beta2, eps, scale, P_DTYPE, AMSGRAD, MAXIMIZE, HAS_SCALE, CUDA_ROUNDING)
        else:
            _step_entries(j, (j >= seg_lo) & (j < seg_hi), idx_ptr, p_ptr, g_ptr, exp_avg_ptr, exp_avg_sq_ptr,
                          max_exp_avg_sq_ptr, numel, err_ptr, decay, neg_step_size, bc2_sqrt, one_minus_beta1, beta2,
                          one_minus_beta2, eps, scale, P_DTYPE, AMSGRAD, MAXIMIZE, HAS_SCALE, CUDA_ROUNDING)


RANGES_LANES = 256  # programs of the fused step per program of _block_ranges_kernel


@triton.jit
def _block_ranges_kernel(table_ptr, n_tensors, idx_ptr, out_ptr, total, n_iter, t_iter, BLOCK: tl.constexpr,
                         LANES: tl.constexpr):
    """For each program ``pid`` of the fused step: the first compact position of its dense block,
    ``lower_bound(idx[seg_lo:seg_hi], b * BLOCK)`` (``seg_lo`` for a tensor's first block), by the
    same bisection the step used to run in every program. Reads idx only inside the segments."""
    pid = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES)
    starts = table_ptr + BLOCK_START * n_tensors
    zero = tl.zeros_like(pid)
    # the tensor owning pid: the last one whose first program is <= pid (as find_block)
    t = lower_bound(starts, zero, zero + n_tensors, pid + 1, t_iter) - 1
    first = tl.load(starts + t)
    seg_lo = tl.load(table_ptr + SEG_LO * n_tensors + t)
    seg_hi = tl.load(table_ptr + SEG_HI * n_tensors + t)
    b = pid - first
    j = lower_bound(idx_ptr, seg_lo, seg_hi, b * BLOCK, n_iter)
    tl.store(out_ptr + pid, tl.where(b == 0, seg_lo, j), mask=pid < total)


def _fused_ranges(table, n: int, idx: torch.Tensor, total: int, block: int, seg: list[int]) -> torch.Tensor:
    """int64 [total]: where each fused program's selected entries start (``_block_ranges_kernel``).
    One launch, on the device, in stream order: no host sync."""
    out = torch.empty(total, dtype=torch.int64, device=idx.device)
    _block_ranges_kernel[(triton.cdiv(total, RANGES_LANES),)](
        table, n, idx, out, total, max(seg).bit_length() + 1, n.bit_length() + 1,
        BLOCK=block, LANES=RANGES_LANES, num_warps=4,
    )
    return out


#: Warps of the plain step per block size: 8 for the GPU's 1024 entries, so 4 entries per thread
#: (one 16-byte vector per compact array). Compiled for sm_90 with Triton 3.7 the step takes 64
#: registers so (32 warps resident per SM), 106 with 4 warps (16 warps per SM; before the vector
#: path, 80 and 24). Untimed: a register/occupancy estimate, to be checked by bench/.
STEP_WARPS = {1024: 8}


def _lr_on_host(lr: torch.Tensor) -> bool:
    """A CPU lr is read on the host (no sync: it already lives there); a device lr in-kernel."""
    return lr.device.type == "cpu"


_INDEX_ERROR_TAIL = (
    "nothing was read or written at them (their optimizer state is unchanged); the other selected entries "
    "were stepped. The index buffer was written after fastmask checked it without bumping its version "
    "(through .data, a numpy view or another tensor on the same storage), or the backend op was called "
    "directly: keep indices in range, sorted and unique, and write them in place only through torch ops."
)


def _index_error(err: torch.Tensor, idx: torch.Tensor, offsets, params) -> str:
    """The IndexError message for a launch whose per-tensor error counts ``err`` are not all zero
    (host tensors: the CPU/interpreter path)."""
    counts = err.tolist()
    bad = [t for t, c in enumerate(counts) if c]
    t = bad[0]
    numel = params[t].numel()
    seg = idx[offsets[t]:offsets[t + 1]].long()
    out = seg[(seg < 0) | (seg >= numel)]
    first = f" (first: {int(out[0])})" if out.numel() else ""
    c = counts[t]
    msg = f"idx: {c} {'index' if c == 1 else 'indices'} of tensor {t} {'is' if c == 1 else 'are'} outside [0, {numel}){first}"
    if len(bad) > 1:
        msg += f", {sum(counts)} in {len(bad)} tensors in all"
    return f"{msg}; {_INDEX_ERROR_TAIL}"


def masked_adamw_step_(
    params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, lr, beta1, beta2, eps,
    weight_decay, maximize, max_exp_avg_sq, grad_scale, found_inf, scores, score_mode,
) -> None:
    """Launch one kernel for all tensors of the call (arguments already checked by fastmask.ops)."""
    n = len(params)
    if n == 0:
        return
    device = params[0].device
    fused = bool(scores)
    seg = [offsets[t + 1] - offsets[t] for t in range(n)]
    block = dense_block(device)
    # Fused: programs tile the dense tensors (every gradient entry is scored); else the segments,
    # from their start rounded down to COMPACT_ALIGN entries (see the kernel).
    align = COMPACT_ALIGN.value
    if fused:
        counts = [triton.cdiv(p.numel(), block) for p in params]
    else:
        counts = [triton.cdiv(k + lo % align, block) if k else 0 for k, lo in zip(seg, offsets)]
    starts, total = [], 0
    for c in counts:
        starts.append(total)
        total += c
    if total == 0:
        return

    rows = [[0] * n for _ in range(TABLE_ROWS)]
    rows[BLOCK_START.value] = starts
    rows[PTR_A.value] = [p.data_ptr() for p in params]
    rows[PTR_B.value] = [g.data_ptr() for g in grads]
    rows[PTR_C.value] = [s.data_ptr() for s in scores] if fused else [0] * n
    rows[SEG_LO.value] = list(offsets[:-1])
    rows[SEG_HI.value] = list(offsets[1:])
    rows[NUMEL.value] = [p.numel() for p in params]
    on_host = _lr_on_host(lr)
    # Out-of-range entries skipped by the kernel, per tensor (a tiny allocation; no host sync).
    err = torch.zeros(n, dtype=torch.int32, device=device)
    with launch_context(device):
        table = _tables.get(rows, device)
        ranges = None
        if fused:
            # Computed once per index buffer (version) and layout, on the device; see DerivedCache
            # for why a stale entry (idx written without a version bump) stays safe here.
            layout = ("fused-ranges", block, tuple(offsets), tuple(rows[NUMEL.value]))
            ranges = _ranges.get(idx, layout, lambda: _fused_ranges(table, n, idx, total, block, seg))
        _masked_adamw_kernel[(total,)](
            table, n, idx, exp_avg, exp_avg_sq, max_exp_avg_sq, steps, err,
            f64_bits(float(lr)) if on_host else 0, None if on_host else lr.reshape(()),
            f64_bits(beta1), f64_bits(beta2), f64_bits(weight_decay),
            f32_bits(1.0 - beta1), f32_bits(beta2), f32_bits(1.0 - beta2), f32_bits(eps),
            grad_scale, found_inf, ranges,
            P_DTYPE=TL_DTYPES[params[0].dtype], LR_ON_DEVICE=not on_host,
            AMSGRAD=max_exp_avg_sq is not None, MAXIMIZE=bool(maximize),
            HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
            FUSED_SCORES=fused, SCORE_MODE=SCORE_MODE_IDS[score_mode], CUDA_ROUNDING=device.type == "cuda",
            DENSE_ALIGNED=fused and aligned16(rows[PTR_B.value] + rows[PTR_C.value]),
            BLOCK=block, SBLOCK=max(16, block // 4), T_PAD=pad_tensors(n),
            num_warps=num_warps_for(block) if fused else STEP_WARPS.get(block, num_warps_for(block)),
            enable_fp_fusion=False,
        )
    if device.type == "cpu":  # the interpreter: the counts are already on the host
        if bool(err.any()):
            raise IndexError(_index_error(err, idx, offsets, params))
    else:  # checked on the device, in stream order: no host sync
        torch._assert_async(err.eq(0).all(),
                            "fastmask masked_adamw_step_ (triton): idx holds indices outside [0, numel) of their "
                            "tensor; " + _INDEX_ERROR_TAIL)
