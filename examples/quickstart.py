"""fastmask quick start: SPU's selective update on a small open_clip CLIP, offline, in seconds.

Builds a CLIP from a config (random init, nothing downloaded), scores the c_fc weights of both
towers on a few batches, keeps the top 10% entries of each, trains 20 steps with MaskedAdamW and
prints what changed. Real work uses pretrained weights and real data: see README.md.

    python examples/quickstart.py
"""
from __future__ import annotations

import argparse
import time

import fastmask.compat

fastmask.compat.patch_torchvision()  # before open_clip imports torchvision (CPU torch + CUDA torchvision wheel)

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastmask  # noqa: E402


def clip_loss(model, batch):
    """CLIP's symmetric contrastive loss between images and their captions."""
    images, tokens = batch
    image_features, text_features, logit_scale = model(images, tokens)
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(images.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=0.1, help="fraction of each c_fc weight to train")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=dict(layers=2, width=64, patch_size=8, image_size=32, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=2),
    )
    # A stand-in task: random images, each with its own random caption.
    batches = [(torch.randn(16, 3, 32, 32), torch.randint(1, 1000, (16, 16))) for _ in range(8)]

    # 1. Localize: c_fc weights of both towers are masked; their biases and visual.proj train densely.
    targets = fastmask.find_targets(model)
    fastmask.freeze(model, targets)
    print(targets)

    # 2. Score: |sum of gradients| over a few batches (the paper's score).
    scores = fastmask.score(model, batches, clip_loss, targets=targets, max_batches=4)

    # 3. Select: the top `density` entries of each tensor, as sorted int32 indices.
    masks = fastmask.select(scores, density=args.density)
    print(masks.summary())

    # 4. Train: MaskedAdamW keeps state only for the selected entries and changes only them.
    opt = fastmask.optim.MaskedAdamW(targets.parameters(), lr=args.lr, weight_decay=0.2, masks=masks, model=model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = time.perf_counter()
    for step in range(args.steps):
        loss = clip_loss(model, batches[step % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad()
    elapsed = time.perf_counter() - start
    print(f"trained {args.steps} steps in {elapsed:.2f} s, last loss {loss.item():.4f}")

    # 5. What changed.
    changed_masked = outside_mask = changed_dense = changed_frozen = 0
    for name, p in model.named_parameters():
        diff = (p.detach() != before[name]).reshape(-1)
        if name in masks:
            selected = masks[name].to_bool().reshape(-1)
            changed_masked += int(diff[selected].sum())
            outside_mask += int(diff[~selected].sum())
        elif name in targets.dense:
            changed_dense += int(diff.sum())
        else:
            changed_frozen += int(diff.sum())
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor))
    print(f"selected c_fc entries changed:   {changed_masked} of {masks.k}")
    print(f"unselected c_fc entries changed: {outside_mask} (bit-exact: {outside_mask == 0})")
    print(f"dense extras changed:            {changed_dense} of {sum(p.numel() for p in targets.dense.values())}")
    print(f"frozen entries changed:          {changed_frozen}")
    print(f"optimizer state: {state_bytes / 1e6:.2f} MB "
          f"(dense AdamW over the same tensors: {2 * 4 * sum(p.numel() for p in targets.parameters()) / 1e6:.2f} MB)")
    print(fastmask.backends.report(("cpu",)))


if __name__ == "__main__":
    main()
