"""Pure-PyTorch implementations of every fastmask op: the oracle for all tests and the fallback
on any device.

Vectorized over entries (gather, fp32 maths on the compact vectors, scatter back); the only
Python loops run over tensors. The order of operations follows ``torch.optim.AdamW``'s
single-tensor implementation so that the two agree to rounding. No host sync: ``found_inf`` is
applied with ``torch.where``, step counts stay on the device.
"""
from __future__ import annotations

import torch


def why_not(device_type: str) -> str | None:
    """The reference backend runs wherever PyTorch does."""
    return None


def _accumulate(score: torch.Tensor, grad: torch.Tensor, mode: str, grad_scale, found_inf) -> None:
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale.reshape(())
    if found_inf is not None:  # a skipped step contributes nothing, in every mode
        g = torch.where(found_inf.reshape(()) != 0, torch.zeros((), device=g.device), g)
    if mode == "grad":
        score.add_(g)
    elif mode == "abs":
        score.add_(g.abs())
    else:  # "fisher": s + g*g, rounded twice (no fused multiply-add), as the kernels do
        score.add_(g * g)


def score_accumulate_(scores: list[torch.Tensor], grads: list[torch.Tensor], mode: str) -> None:
    for score, grad in zip(scores, grads):
        _accumulate(score, grad, mode, None, None)


def _flat(t: torch.Tensor, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1-D view over ``t``'s memory and the positions in it of ``t``'s logical flat entries
    ``sel`` (positions in ``t.reshape(-1)``), for any strided layout.

    Contiguous tensors take ``sel`` as it is. Otherwise the positions come from the strides, so
    they can only be trusted for in-range entries: those are checked here (one read of ``sel``;
    this is the slow path), so nothing outside ``t`` is ever addressed.
    """
    if t.is_contiguous():
        return t.view(-1), sel
    n = t.numel()
    if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= n):
        raise IndexError(f"idx: index out of range for a tensor of {n} entries")
    rem, pos = sel.long(), torch.zeros(sel.shape, dtype=torch.int64, device=sel.device)
    for size, stride in zip(reversed(t.shape), reversed(t.stride())):
        pos += (rem % size) * stride
        rem = rem // size
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if n else 0
    return t.as_strided((span,), (1,)), pos


def _expand(per_tensor: torch.Tensor, counts: list[int]) -> torch.Tensor:
    # One value per entry, without copying `counts` to the device (repeat_interleave would).
    return torch.cat([per_tensor[t].expand(c) for t, c in enumerate(counts)])


def masked_adamw_step_(
    params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, lr, beta1, beta2, eps,
    weight_decay, maximize, max_exp_avg_sq, grad_scale, found_inf, scores, score_mode,
) -> None:
    for score, grad in zip(scores, grads):
        _accumulate(score, grad, score_mode, grad_scale, found_inf)

    k_total = idx.numel()
    if k_total == 0:
        return
    counts = [offsets[t + 1] - offsets[t] for t in range(len(params))]
    sel = [idx[offsets[t] : offsets[t + 1]] for t in range(len(params))]

    # fp32 maths (fp64 for fp64 params), as the state.
    wdt = exp_avg.dtype
    # index_select takes the int32 indices as they are (advanced indexing with .long() is far
    # slower on the CPU). Every gather runs before anything is written: a bad index raises first.
    p_flat = [_flat(p, s) for p, s in zip(params, sel)]
    g_flat = [_flat(gr, s) for gr, s in zip(grads, sel)]
    p_old = torch.cat([torch.index_select(v, 0, s) for v, s in p_flat]).to(wdt)
    g = torch.cat([torch.index_select(v, 0, s) for v, s in g_flat]).to(wdt)
    if grad_scale is not None:
        g = g / grad_scale.reshape(())
    if maximize:
        g = -g

    # Per-tensor scalars in float64, rounded to fp32 once (as torch.optim.AdamW's Python-float
    # scalars are), then expanded to one value per entry.
    wide = torch.float64 if steps.device.type != "mps" else torch.float32
    steps64, lr64 = steps.to(wide), lr.reshape(()).to(wide)
    bias_correction1 = 1 - torch.pow(beta1, steps64)
    bias_correction2_sqrt = (1 - torch.pow(beta2, steps64)).sqrt()
    neg_step_size = _expand((-lr64 / bias_correction1).to(wdt), counts)
    bias_correction2_sqrt = _expand(bias_correction2_sqrt.to(wdt), counts)
    decay = (1 - lr64 * weight_decay).to(wdt)

    p = p_old * decay
    m = exp_avg.lerp(g, 1 - beta1)
    v = exp_avg_sq.mul(beta2).addcmul_(g, g, value=1 - beta2)
    if max_exp_avg_sq is not None:
        v_max = torch.maximum(max_exp_avg_sq, v)
        denom = (v_max.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p = p + neg_step_size * m / denom  # addcdiv_'s order: (value * m) / denom

    if found_inf is not None:
        skip = found_inf.reshape(()) != 0
        p = torch.where(skip, p_old, p)
        m = torch.where(skip, exp_avg, m)
        v = torch.where(skip, exp_avg_sq, v)
        if max_exp_avg_sq is not None:
            v_max = torch.where(skip, max_exp_avg_sq, v_max)

    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if max_exp_avg_sq is not None:
        max_exp_avg_sq.copy_(v_max)
    for t, (param, (view, s)) in enumerate(zip(params, p_flat)):
        view.index_copy_(0, s.long(), p[offsets[t] : offsets[t + 1]].to(param.dtype))


def sampled_weight_grad(grad_out: torch.Tensor, input: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gathered rows of ``grad_out.T`` and ``input.T`` multiplied and summed, in chunks that bound
    the gathered temporaries; float32 (float64 for float64 inputs). Indices are range-checked
    before anything is computed (on a device, asynchronously)."""
    n_out, n_in = grad_out.shape[1], input.shape[1]
    inside = (idx >= 0) & (idx < n_out * n_in)
    if idx.device.type != "cpu":  # checked on the device: no host sync in a backward pass
        torch._assert_async(inside.all(), f"idx: an index is outside [0, {n_out * n_in}) for a weight of shape "
                            f"[{n_out}, {n_in}]")
    elif idx.numel() and not bool(inside.all()):
        bad = idx[~inside]
        raise IndexError(f"idx: {bad.numel()} indices are outside [0, {n_out * n_in}) for a weight of shape "
                         f"[{n_out}, {n_in}]; the first is {int(bad[0])}")
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    a = grad_out.t().to(acc).contiguous()  # [out, T]
    b = input.t().to(acc).contiguous()  # [in, T]
    q = idx.long()
    rows, cols = q // n_in, q % n_in
    out = torch.empty(idx.numel(), dtype=acc, device=grad_out.device)
    chunk = max(1, (1 << 22) // max(1, grad_out.shape[0]))
    for s in range(0, idx.numel(), chunk):
        e = min(s + chunk, idx.numel())
        out[s:e] = (a[rows[s:e]] * b[cols[s:e]]).sum(1)
    return out
