"""Tolerances, problem builders and comparisons shared by the tests.

Tolerances are stated per dtype. ``STEP_TOL`` compares a backend's result against the reference
backend after the same steps (same maths, possibly another order of fp32 operations or fused
multiply-adds): parameters are stored in their own dtype, so the bound is about one unit in the
last place of that dtype; fp32 optimizer state is compared with the fp32 bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: (rtol, atol) for a backend vs the reference, per parameter dtype.
STEP_TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}
#: (rtol, atol) for bf16/fp16 runs vs an fp32 run of the same problem (storage rounding
#: accumulates over steps: this bounds the drift, not the per-step error).
LOWP_VS_FP32_TOL = {
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}


def tol(dtype: torch.dtype) -> dict:
    rtol, atol = STEP_TOL[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str = "") -> None:
    """``torch.testing.assert_close`` that also prints the first differing elements."""
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=False)
    except AssertionError as exc:
        a, e = actual.detach().float().reshape(-1).cpu(), expected.detach().float().reshape(-1).cpu()
        bad = (~torch.isclose(a, e, rtol=rtol, atol=atol)) | a.isnan() | e.isnan()
        where = bad.nonzero().squeeze(1)[:10].tolist()
        rows = "\n".join(f"  [{i}] actual={a[i].item()!r} expected={e[i].item()!r}" for i in where)
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements differ\n{rows}\n{exc}") from None


def random_indices(numel: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` distinct sorted int32 flat indices in ``[0, numel)``."""
    return torch.sort(torch.randperm(numel, generator=generator)[:k]).values.to(torch.int32)


@dataclass
class Problem:
    """One masked-step problem on the flat compact layout (see fastmask.ops)."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    idx: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor
    offsets: list[int]
    steps: torch.Tensor

    def clone(self) -> Problem:
        def c(x):
            if isinstance(x, torch.Tensor):
                return x.clone()
            return [t.clone() if isinstance(t, torch.Tensor) else t for t in x]

        return Problem(*(c(getattr(self, f)) for f in self.__dataclass_fields__))


def make_problem(shapes, dtype=torch.float32, density=0.1, device="cpu", seed=0, step=3) -> Problem:
    """Random params/grads (never zeros), random masks at ``density``, non-trivial fp32 state."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    idxs = [random_indices(p.numel(), int(density * p.numel()), g) for p in params]
    offsets = [0]
    for i in idxs:
        offsets.append(offsets[-1] + i.numel())
    k = offsets[-1]
    return Problem(
        params=params,
        grads=grads,
        idx=(torch.cat(idxs) if idxs else torch.empty(0, dtype=torch.int32)).to(device),
        exp_avg=(0.1 * torch.randn(k, generator=g)).to(device),
        exp_avg_sq=(0.01 * torch.rand(k, generator=g) + 1e-4).to(device),
        max_exp_avg_sq=(0.02 * torch.rand(k, generator=g) + 1e-4).to(device),
        offsets=offsets,
        steps=torch.full((len(shapes),), float(step)).to(device) + torch.arange(len(shapes), device=device),
    )


def tiny_open_clip(seed: int = 0):
    """A small open_clip CLIP built from a config (random init, nothing downloaded)."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(layers=2, width=64, patch_size=8, image_size=32, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2),
    )


def clip_batches(n: int, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(1, 100, (batch, 16), generator=g)) for _ in range(n)]


def clip_loss(model, batch):
    """CLIP's symmetric contrastive loss on a batch of (images, tokens)."""
    images, tokens = batch
    f_img, f_txt, scale = model(images, tokens)
    logits = scale * f_img @ f_txt.T
    labels = torch.arange(images.shape[0])
    return (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2


#: Out-of-range index values for the bounds-check tests, three each, in the order they are placed.
BAD_INDEX_VALUES = {
    "past-end": lambda n: [n, n + 1, n + 2],
    "far": lambda n: [2**30, 2**31 - 2, 2**31 - 1],
    "minus-one": lambda n: [-3, -2, -1],
    "int32-min": lambda n: [-(2**31), -(2**31) + 1, -(2**30)],
}


def poisoned_problem(shapes, dtype, *, density, seed, guard, device="cpu"):
    """make_problem(shapes) whose params and grads are views of one larger buffer each, with
    ``guard`` poisoned entries before, between and after the tensors.

    Returns ``(problem, param_buffer, grad_buffer, inside)``, ``inside`` marking the buffer
    entries that belong to a tensor (everything else must never be written)."""
    pr = make_problem(shapes, dtype=dtype, density=density, seed=seed, device=device)
    sizes = [p.numel() for p in pr.params]
    total = guard + sum(n + guard for n in sizes)
    gen = torch.Generator().manual_seed(seed + 1)
    pbuf = torch.randn(total, generator=gen).to(device=device, dtype=dtype)
    gbuf = torch.randn(total, generator=gen).to(device=device, dtype=dtype)
    inside = torch.zeros(total, dtype=torch.bool)
    params, grads, pos = [], [], guard
    for p, g, n in zip(pr.params, pr.grads, sizes):
        params.append(pbuf[pos:pos + n].view(p.shape))
        grads.append(gbuf[pos:pos + n].view(p.shape))
        params[-1].copy_(p)
        grads[-1].copy_(g)
        inside[pos:pos + n] = True
        pos += n + guard
    pr.params, pr.grads = params, grads
    return pr, pbuf, gbuf, inside


def assert_steps_never_sync_the_host(backend: str, variant: str, device: str = "cuda", seed: int = 0) -> None:
    """``torch.cuda.set_sync_debug_mode("error")`` around ``MaskedAdamW`` steps through ``backend``:
    no step after the first (which checks the masks' index buffers) waits for the GPU.

    ``variant``: ``"plain"``; ``"scores-tensor-lr"`` (a device lr, tracked scores, capturable dense
    steps); ``"grad-scaler"`` (GradScaler's skip/unscale inside the op; the dense parameter takes
    PyTorch's fused AdamW, the non-fused one needs a host sync under GradScaler)."""
    import fastmask
    from fastmask import backends

    gen = torch.Generator().manual_seed(seed)
    shapes = [(300, 77), (7,), (2048, 5)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    dense = torch.nn.Parameter(torch.randn(5, 3, generator=gen).to(device))
    masks = {p: random_indices(p.numel(), max(1, p.numel() // 10), gen) for p in params}
    tensor_lr = variant == "scores-tensor-lr"
    opt = fastmask.MaskedAdamW([{"params": params}, {"params": [dense]}],
                               lr=torch.tensor(1e-3, device=device) if tensor_lr else 1e-3, weight_decay=0.1,
                               masks=masks, track_scores="abs" if tensor_lr else None, capturable=tensor_lr,
                               fused=True if variant == "grad-scaler" else None)
    grads = [[torch.randn(p.shape, generator=gen).to(device) for p in params + [dense]] for _ in range(4)]
    scaler = torch.amp.GradScaler("cuda") if variant == "grad-scaler" else None
    if scaler is not None:
        scaler.scale(torch.ones((), device=device))  # initializes the scale on the device

    def step(i):
        for p, g in zip(params + [dense], grads[i]):
            p.grad = g.clone()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    with backends.use(backend):
        step(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(1, 4):
                step(i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    assert all(bool(torch.isfinite(p).all()) for p in params)
