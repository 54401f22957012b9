"""End-to-end training step of an open_clip CLIP: set-up shared by ``test_train_step.py`` and its
memory-measuring subprocess (``python -m bench.train_step --model small --method fastmask``).

Methods (all with the CLIP contrastive loss, lr 1e-5, weight decay 0.1, masks at ``density``):

- ``fastmask``: SPU's trainable set (c_fc weights masked, c_fc biases and ``visual.proj`` dense,
  everything else frozen), masks from ``fastmask.score`` (one batch) + ``fastmask.select``,
  ``fastmask.MaskedAdamW``;
- ``adamw_fused+mask``: the same trainable set and masks as dense fp32 masks multiplied into the
  gradients with ``torch._foreach_mul_``, then ``AdamW(fused=True)``;
- ``original``: the same, SPU-code style: Python loop of ``grad.mul_(mask)``, one param group per
  parameter, ``AdamW(foreach=False)``;
- ``full``: full fine-tuning, every parameter trainable, ``AdamW(fused=True)``.

Memory (subprocess per case, so that cases do not share an allocator): ``rss_setup`` is the
resident set after the model, data, masks and optimizer are built; ``maxrss`` the peak resident
set (``VmHWM`` of /proc/self/status) after the warm-up and timed steps; their
difference is what training adds (activations, gradients, optimizer state, temporaries). On CUDA
also ``torch.cuda.max_memory_allocated`` over the steps.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

METHODS = ("fastmask", "adamw_fused+mask", "original", "full")
LR, WD = 1e-5, 0.1


def build_model(name: str, seed: int = 0):
    import fastmask.compat

    fastmask.compat.patch_torchvision()
    if name == "small":
        import open_clip

        torch.manual_seed(seed)
        return open_clip.CLIP(
            embed_dim=256,
            vision_cfg=dict(layers=4, width=256, patch_size=16, image_size=64, head_width=64),
            text_cfg=dict(context_length=32, vocab_size=49408, width=256, heads=4, layers=4),
        )
    from bench.common import build_clip

    return build_clip(name, seed)


def clip_loss(model, batch):
    images, tokens = batch
    f_img, f_txt, scale = model(images, tokens)
    logits = scale * f_img @ f_txt.T
    labels = torch.arange(images.shape[0], device=logits.device)
    ce = torch.nn.functional.cross_entropy
    return (ce(logits, labels) + ce(logits.T, labels)) / 2


class Case:
    """Model, data and optimizer of one method; ``step()`` runs one training step."""

    def __init__(self, model_name: str, method: str, device: str, batch: int, density: float = 0.1):
        import fastmask
        from bench.common import clip_random_batches

        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        self.device = torch.device(device)
        model = build_model(model_name).to(self.device)
        data = clip_random_batches(model, 1, batch, seed=1)
        self.batch = tuple(t.to(self.device) for t in data[0])
        targets = fastmask.find_targets(model, "open_clip")
        masked = list(targets.masked.values())
        if method != "full":
            scores = fastmask.score(model, [self.batch], clip_loss, targets=targets.masked, progress=False)
            maskset = fastmask.select(scores, density)
            idxs = {p: maskset[n].indices.to(self.device) for n, p in targets.masked.items()}
            self.k = maskset.k
        else:
            idxs, self.k = {}, None
        self.n_masked = sum(p.numel() for p in masked)
        self.dense_masks = []
        if method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            self.opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused=True)
        else:
            fastmask.freeze(model, targets)
            params = targets.parameters()
            if method == "fastmask":
                self.opt = fastmask.MaskedAdamW(params, lr=LR, weight_decay=WD, masks=idxs, model=model)
            else:
                for p in masked:
                    m = torch.zeros(p.numel(), dtype=torch.float32, device=self.device)
                    m[idxs[p].long()] = 1
                    self.dense_masks.append(m.view(p.shape))
                if method == "adamw_fused+mask":
                    self.opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True)
                else:
                    self.opt = torch.optim.AdamW([{"params": [p]} for p in params], lr=LR, weight_decay=WD,
                                                 foreach=False)
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.model, self.method, self.masked = model, method, masked

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = clip_loss(self.model, self.batch)
        loss.backward()
        if self.method == "adamw_fused+mask":
            torch._foreach_mul_([p.grad for p in self.masked], self.dense_masks)
        elif self.method == "original":
            for p, m in zip(self.masked, self.dense_masks):
                p.grad.mul_(m)
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def state_bytes(self) -> int:
        from bench.common import state_bytes

        return state_bytes(self.opt)


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def _peak_rss_kib() -> int:
    """Peak resident set of this process image: ``VmHWM``. (``ru_maxrss`` would not do: Linux
    carries it across ``execve``, so a child forked from a large pytest process inherits the
    parent's peak.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    case = Case(args.model, args.method, args.device, args.batch, args.density)
    rss_setup = _rss_kib()
    if case.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps + 1):  # one warm-up step (creates optimizer state)
        t0 = time.perf_counter()
        case.step()
        times.append(time.perf_counter() - t0)
    out = {
        "rss_setup_kib": rss_setup,
        "maxrss_kib": _peak_rss_kib(),
        "step_s": times[1:],
        "opt_state_bytes": case.state_bytes(),
        "trainable": case.trainable,
        "params": case.n_params,
        "K": case.k,
        "N_masked": case.n_masked,
    }
    if case.device.type == "cuda":
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
