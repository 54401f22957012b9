"""The model side of the job: tokenizers, the loss, the embedded small CLIP and its pretraining.

Tokenizer. For real use the job takes open_clip's tokenizer of ``--model``
(``open_clip.get_tokenizer``; for OpenAI-style models that is ``SimpleTokenizer``, whose BPE vocab
ships inside open_clip and loads offline). The embedded default instead uses :class:`WordTokenizer`,
a word-level tokenizer over the benchmark's prompts: BPE would give the small CLIP a 49408-row
token embedding, 20 times the rest of the model, for a vocabulary of a dozen words.

Loss. :func:`contrastive_loss` is CLIP's loss between images and their *class* captions: the
image-to-caption cross-entropy over the captions of the classes being trained, plus a
caption-to-image term in which a caption has several positives (every image of its class in the
batch), averaged over the captions present in the batch. :func:`l2_logits_loss` is the original SPU
code's scoring loss (no labels in the loss itself; each image is paired with its own caption).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The small CLIP of the embedded default: width 64, 2 layers per tower.
TINY_CLIP = dict(
    embed_dim=64,
    vision_cfg=dict(layers=2, width=64, head_width=32, patch_size=8, image_size=32, mlp_ratio=4.0),
    text_cfg=dict(context_length=8, width=64, heads=2, layers=2),
)


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary, in open_clip's token layout.

    Ids: 0 = padding, 1 = start of text, the words, then end of text as the *highest* id (open_clip's
    text tower pools the features at ``argmax`` of the ids, i.e. at the end-of-text token).
    """

    def __init__(self, texts: Sequence[str], context_length: int = 8) -> None:
        words = sorted({w for t in texts for w in self.split(t)})
        self.vocab = {w: i + 2 for i, w in enumerate(words)}
        self.sot, self.eot = 1, len(words) + 2
        self.vocab_size = len(words) + 3
        self.context_length = context_length

    @staticmethod
    def split(text: str) -> list[str]:
        return text.lower().replace(",", " ").replace(".", " ").split()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            words = self.split(t)
            unknown = [w for w in words if w not in self.vocab]
            if unknown:
                raise KeyError(f"WordTokenizer: {unknown} not in the vocabulary")
            ids = [self.sot] + [self.vocab[w] for w in words][: self.context_length - 2] + [self.eot]
            out[i, : len(ids)] = torch.as_tensor(ids)
        return out


def build_tiny_clip(vocab_size: int, context_length: int = 8, seed: int = 0) -> nn.Module:
    """The embedded default's small open_clip CLIP, built from :data:`TINY_CLIP` (random init)."""
    import open_clip

    cfg = copy.deepcopy(TINY_CLIP)
    cfg["text_cfg"].update(vocab_size=vocab_size, context_length=context_length)
    torch.manual_seed(seed)
    return open_clip.CLIP(**cfg)


def contrastive_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, caption_tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's contrastive loss between images and their class captions.

    ``labels[i]`` is the row of ``caption_tokens`` that describes image ``i``. Image to caption:
    cross-entropy over all captions. Caption to image: for each caption with images in the batch,
    the mean negative log-probability of its images among the batch's images (several positives).
    """
    img, txt, scale = model(images, caption_tokens)[:3]
    logits = scale * img @ txt.T  # [B, C]
    loss_i2t = F.cross_entropy(logits, labels)
    log_p = F.log_softmax(logits.T, dim=1)  # [C, B]: each caption over the batch's images
    positive = F.one_hot(labels, logits.shape[1]).T.to(log_p.dtype)  # [C, B]
    present = positive.sum(1) > 0
    loss_t2i = -((log_p * positive).sum(1)[present] / positive.sum(1)[present]).mean()
    return (loss_i2t + loss_t2i) / 2


def l2_logits_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   caption_tokens: torch.Tensor) -> torch.Tensor:
    """The original SPU code's scoring loss: each image's caption is its class prompt (one text per
    image, as the original's data loader gives), the logits are ``[B, B]`` image-to-text, and the
    loss is the squared L2 norm of each image's row averaged over images
    (:func:`fastmask.scoring.l2_logits_loss`). The labels only pick the captions."""
    from fastmask.scoring import l2_logits_loss as original

    return original(model, (images, caption_tokens[labels]))


@torch.no_grad()
def text_features(model: nn.Module, tokens: torch.Tensor, device) -> torch.Tensor:
    return F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1)


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, loader, caption_tokens: torch.Tensor, class_ids: Sequence[int],
                       device, autocast=None) -> float:
    """Accuracy of zero-shot classification among ``class_ids``, whose prompts are ``caption_tokens``.

    Images whose label is not in ``class_ids`` are skipped.
    """
    was_training = model.training
    model.eval()
    lookup = {c: i for i, c in enumerate(class_ids)}
    correct = total = 0
    with autocast() if autocast else torch.autocast("cpu", enabled=False):
        txt = text_features(model, caption_tokens, device)
        for images, labels in loader:
            keep = torch.as_tensor([int(y) in lookup for y in labels.tolist()], dtype=torch.bool)
            if not keep.any():
                continue
            target = torch.as_tensor([lookup[int(y)] for y in labels[keep].tolist()])
            img = F.normalize(model.encode_image(images[keep].to(device)).float(), dim=-1)
            pred = (img @ txt.T).argmax(1).cpu()
            correct += int((pred == target).sum())
            total += int(keep.sum())
    model.train(was_training)
    return correct / total if total else float("nan")


# ---------------------------------------------------------------------------------------------
# Pretraining of the embedded default (cached)
# ---------------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastmask", "continual")


def pretrain_tiny_clip(bench, tokenizer: WordTokenizer, *, seed: int, epochs: int = 100, lr: float = 2e-3,
                       batch_size: int = 64, weight_decay: float = 0.1, cache_dir: str | None = None,
                       device="cpu", progress: bool = True, log=print) -> tuple[nn.Module, dict]:
    """The base model of the embedded default: the small CLIP trained on the base classes.

    Trained with :func:`contrastive_loss` and AdamW (cosine schedule) on ``bench.pretrain``. The
    weights are cached in ``cache_dir`` (default ``~/.cache/fastmask/continual``) under a hash of
    everything that determines them, so the next run loads them instead. Returns the model and a
    dict describing the pretraining (``cached``, ``seconds``, ``key``).
    """
    from tqdm.auto import tqdm

    key_src = json.dumps(dict(v=2, model=TINY_CLIP, vocab=tokenizer.vocab, ctx=tokenizer.context_length,
                              bench=bench.name, n=len(bench.pretrain), base=bench.base, seed=seed, epochs=epochs,
                              lr=lr, batch=batch_size, wd=weight_decay), sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"tiny_clip_{key}.safetensors")
    model = build_tiny_clip(tokenizer.vocab_size, tokenizer.context_length, seed=seed).to(device)
    if os.path.exists(path):
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path, device=str(device)))
        log(f"pretrained base model (seed {seed}) loaded from cache: {path}")
        return model, dict(cached=True, seconds=0.0, key=key, path=path)

    t0 = time.perf_counter()
    random.seed(seed)  # the augmentation draws from Python's random
    names = [bench.class_names[c] for c in bench.base]
    from .data import prompts

    tokens = tokenizer(prompts(names)).to(device)
    lookup = torch.full((len(bench.class_names),), -1, dtype=torch.long)
    lookup[torch.as_tensor(bench.base)] = torch.arange(len(bench.base))
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(bench.pretrain))  # a small --limit-per-class still makes one batch
    loader = torch.utils.data.DataLoader(bench.pretrain, batch_size=batch_size, shuffle=True, generator=g, drop_last=True)
    log(f"pretraining the base model (seed {seed}, {epochs} epochs on {len(bench.pretrain)} images; cached afterwards)")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader), pct_start=0.1)
    model.train()
    bar = tqdm(range(epochs), desc=f"pretraining base model (seed {seed})", unit="epoch", disable=not progress)
    for _ in bar:
        for images, labels in loader:
            loss = contrastive_loss(model, images.to(device), lookup[labels].to(device), tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - t0
    os.makedirs(cache_dir, exist_ok=True)
    from safetensors.torch import save_file

    tmp = path + f".tmp{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    log(f"pretrained base model (seed {seed}) in {seconds:.0f} s, cached at {path}")
    return model, dict(cached=False, seconds=seconds, key=key, path=path)


def load_open_clip(name: str, pretrained: str | None, device) -> tuple[nn.Module, object, object, object]:
    """Any open_clip model by name, with weights from a local checkpoint file (or none).

    Returns ``(model, train_transform, eval_transform, tokenizer)``.
    """
    import open_clip

    if pretrained is not None and not os.path.exists(pretrained):
        raise FileNotFoundError(f"--pretrained {pretrained}: no such file (the job never downloads weights)")
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    return model, train_tf, eval_tf, open_clip.get_tokenizer(name)
