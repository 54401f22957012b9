"""Data for the continual job: the embedded digits benchmark, ImageFolder directories, task splits.

A :class:`Benchmark` holds everything the loop needs: one label space (``class_names``) shared by
the training and test sets of the tasks, the tasks themselves (lists of class ids, disjoint), and
a held-out *control set* with its own class names, which measures how much of the base model's
generic knowledge survives.

The embedded default uses scikit-learn's handwritten digits (``sklearn.datasets.load_digits``:
1797 greyscale 8x8 images, bundled with scikit-learn, BSD-3 licence), upsampled to 32x32. The base
model is pretrained on digits 0-4 (those are also the control set's classes, with a held-out
split) and then taught the tasks [5, 6] and [7, 8, 9].
"""
from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_BASE = (0, 1, 2, 3, 4)
DIGITS_TASKS = ((5, 6), (7, 8, 9))
PROMPT = "a photo of a {}"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def prompts(class_names: Sequence[str], template: str = PROMPT) -> list[str]:
    """The class prompts, one per class name: ``"a photo of a {class}"``."""
    return [template.format(c) for c in class_names]


class TensorImages(Dataset):
    """Images held in memory as one normalized float tensor ``[N, 3, H, W]``, with int labels.

    ``augment=True`` applies a light augmentation per sample: a random shift of up to ``shift``
    pixels (zero padding, then a random crop back to size) and a random contrast/brightness jitter.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False, shift: int = 3) -> None:
        self.images, self.labels, self.augment, self.shift = images, labels.long(), augment, shift

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.augment:
            s = self.shift
            h, w = x.shape[-2:]
            padded = torch.nn.functional.pad(x, (s, s, s, s), value=float(x.min()))
            dy, dx = random.randint(0, 2 * s), random.randint(0, 2 * s)
            x = padded[:, dy:dy + h, dx:dx + w]
            x = x * random.uniform(0.8, 1.2) + random.uniform(-0.2, 0.2)
        return x, int(self.labels[i])


class ImageFiles(Dataset):
    """Image files with int labels and a transform (e.g. open_clip's preprocess)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform=None) -> None:
        self.paths, self.labels, self.transform = list(paths), torch.as_tensor(list(labels), dtype=torch.long), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")
        return (self.transform(img) if self.transform is not None else img), int(self.labels[i])


def labels_of(ds: Dataset) -> torch.Tensor:
    """The labels of a dataset built here, or of a ``Subset`` of one."""
    if isinstance(ds, torch.utils.data.Subset):
        return labels_of(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    return ds.labels


def subset(ds: Dataset, classes: Sequence[int]) -> torch.utils.data.Subset:
    """The samples of ``ds`` whose label is in ``classes``."""
    keep = torch.isin(labels_of(ds), torch.as_tensor(list(classes), dtype=torch.long))
    return torch.utils.data.Subset(ds, keep.nonzero().squeeze(1).tolist())


@dataclass
class Benchmark:
    """A class-incremental benchmark with a control set.

    ``train``/``test`` are labelled in ``class_names``' ids; ``tasks`` are disjoint lists of those
    ids; ``base`` are the ids the base model already knows (empty for real data, where the control
    set has its own label space); ``control`` is labelled in ``control_names``' ids.
    """

    name: str
    class_names: list[str]
    tasks: list[list[int]]
    train: Dataset
    test: Dataset
    control: Dataset
    control_names: list[str]
    base: list[int] = field(default_factory=list)
    pretrain: Dataset | None = None  # the base classes' training data (embedded default only)

    def seen(self, t: int) -> list[int]:
        """Class ids seen after task ``t`` (0-based): the base classes and tasks 0..t."""
        return list(self.base) + [c for task in self.tasks[: t + 1] for c in task]

    def describe(self) -> str:
        tasks = "; ".join(", ".join(self.class_names[c] for c in t) for t in self.tasks)
        return (f"{self.name}: {len(self.tasks)} tasks [{tasks}]; {len(self.train)} train / {len(self.test)} test "
                f"images; control set: {len(self.control)} images of {len(self.control_names)} classes")


def check_tasks(tasks: Sequence[Sequence[int]], n_classes: int) -> None:
    """Tasks must be disjoint, in range, and have at least two classes each."""
    seen: set[int] = set()
    for i, t in enumerate(tasks):
        if len(t) < 2:
            raise ValueError(f"task {i + 1} has {len(t)} class(es): the contrastive loss of a task with one class "
                             "is zero (its images have a single caption); use at least two classes per task")
        for c in t:
            if not 0 <= c < n_classes:
                raise ValueError(f"task {i + 1}: class id {c} out of range [0, {n_classes})")
            if c in seen:
                raise ValueError(f"class id {c} appears in two tasks")
            seen.add(c)


def split_classes(classes: Sequence[int], n_tasks: int, seed: int | None = None) -> list[list[int]]:
    """Split ``classes`` into ``n_tasks`` class-incremental tasks of near-equal size (shuffled by ``seed``)."""
    classes = list(classes)
    if seed is not None:
        random.Random(seed).shuffle(classes)
    if not 1 <= n_tasks <= len(classes) // 2:
        raise ValueError(f"tasks: {len(classes)} classes make between 1 and {len(classes) // 2} tasks of at least "
                         f"two classes, got {n_tasks}")
    sizes = [len(classes) // n_tasks + (1 if i < len(classes) % n_tasks else 0) for i in range(n_tasks)]
    out, start = [], 0
    for s in sizes:
        out.append(sorted(classes[start:start + s]))
        start += s
    return out


def _stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)].tolist()
        n_test = max(1, round(test_fraction * len(idx)))
        test += idx[:n_test]
        train += idx[n_test:]
    return sorted(train), sorted(test)


# ---------------------------------------------------------------------------------------------
# The embedded default: scikit-learn's digits
# ---------------------------------------------------------------------------------------------
def digits_benchmark(image_size: int = 32, test_fraction: float = 0.25, limit_per_class: int | None = None,
                     split_seed: int = 0) -> Benchmark:
    """The embedded benchmark: digits 0-4 are the base (pretraining + control set), then [5, 6], [7, 8, 9].

    The 8x8 images (values 0..16) are upsampled bilinearly to ``image_size``, repeated to three
    channels and normalized to mean 0, std 1 (statistics of the whole set). The train/test split is
    stratified and fixed by ``split_seed`` (independent of the run's seeds); ``limit_per_class``
    keeps only that many images per class (for tests).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.as_tensor(d.target, dtype=torch.long)
    if limit_per_class is not None:
        keep = torch.cat([(y == c).nonzero().squeeze(1)[:limit_per_class] for c in range(10)]).sort().values
        x, y = x[keep], y[keep]
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).expand(-1, 3, -1, -1).contiguous()
    train_idx, test_idx = _stratified_split(y, test_fraction, split_seed)
    train = TensorImages(x[train_idx], y[train_idx], augment=True)
    test = TensorImages(x[test_idx], y[test_idx])
    base = list(DIGITS_BASE)
    tasks = [list(t) for t in DIGITS_TASKS]
    check_tasks(tasks, 10)
    # The control set: held-out images of the base classes, labelled 0..4 in their own label space.
    control = subset(test, base)
    return Benchmark(
        name="digits (sklearn load_digits, 8x8 upsampled to %d)" % image_size,
        class_names=list(DIGIT_NAMES), tasks=tasks, train=train, test=test, control=control,
        control_names=[DIGIT_NAMES[c] for c in base], base=base, pretrain=subset(train, base),
    )


# ---------------------------------------------------------------------------------------------
# Real data: ImageFolder-style directories
# ---------------------------------------------------------------------------------------------
def class_name(folder: str) -> str:
    """A folder name as a class name for prompts: ``golden_retriever`` -> ``golden retriever``."""
    return folder.replace("_", " ").replace("-", " ").strip()


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
    """``root/<class>/<image>`` -> (class names, paths, labels); classes in sorted folder order."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a directory")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    names, paths, labels = [], [], []
    for folder in folders:
        files = sorted(
            os.path.join(dirpath, f)
            for dirpath, _, fs in os.walk(os.path.join(root, folder))
            for f in fs if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            continue
        names.append(class_name(folder))
        paths += files
        labels += [len(names) - 1] * len(files)
    if not names:
        raise ValueError(f"{root}: no class folder with images ({', '.join(IMAGE_EXTENSIONS)})")
    return names, paths, labels


def folder_benchmark(data: str | os.PathLike, control: str | os.PathLike, n_tasks: int, train_transform,
                     eval_transform, test_fraction: float = 0.2, split_seed: int = 0,
                     shuffle_classes: bool = False) -> Benchmark:
    """A benchmark from ImageFolder-style directories.

    The classes of ``data`` (folder names) are split into ``n_tasks`` class-incremental tasks
    (sorted order, or shuffled by ``split_seed`` with ``shuffle_classes``); each class's images are
    split into train and test (stratified, ``test_fraction``). Every image of ``control`` is in the
    control set, with the control folders' names as its classes.
    """
    names, paths, labels = scan_image_folder(data)
    tasks = split_classes(range(len(names)), n_tasks, seed=split_seed if shuffle_classes else None)
    check_tasks(tasks, len(names))
    train_idx, test_idx = _stratified_split(torch.as_tensor(labels), test_fraction, split_seed)
    train = ImageFiles([paths[i] for i in train_idx], [labels[i] for i in train_idx], train_transform)
    test = ImageFiles([paths[i] for i in test_idx], [labels[i] for i in test_idx], eval_transform)
    c_names, c_paths, c_labels = scan_image_folder(control)
    return Benchmark(
        name=f"ImageFolder {os.fspath(data)} (control: {os.fspath(control)})",
        class_names=names, tasks=tasks, train=train, test=test,
        control=ImageFiles(c_paths, c_labels, eval_transform), control_names=c_names,
    )


# ---------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------
class ReplayBuffer:
    """A small task-balanced buffer of earlier tasks' training samples.

    After each task, :meth:`add_task` stores up to ``per_task`` samples of that task (class-balanced
    within the task). :meth:`sample` draws ``n`` samples spread evenly over the stored tasks, to be
    concatenated to a batch of the current task.
    """

    def __init__(self, per_task: int, seed: int = 0) -> None:
        self.per_task = per_task
        self.tasks: list[list[tuple[Dataset, int, int]]] = []  # (dataset, index, label)
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return sum(len(t) for t in self.tasks)

    @property
    def classes(self) -> list[int]:
        return sorted({y for t in self.tasks for _, _, y in t})

    def add_task(self, ds: Dataset) -> None:
        if self.per_task <= 0:
            return
        labels = labels_of(ds)
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels.tolist()):
            by_class.setdefault(y, []).append(i)
        for idx in by_class.values():
            self.rng.shuffle(idx)
        chosen, classes = [], sorted(by_class)
        while len(chosen) < self.per_task and any(by_class[c] for c in classes):
            for c in classes:
                if by_class[c] and len(chosen) < self.per_task:
                    chosen.append(by_class[c].pop())
        # Stored as dataset indices, read through the dataset (so augmentation still applies).
        self.tasks.append([(ds, i, int(labels[i])) for i in chosen])

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if n <= 0 or not self.tasks:
            return None
        xs, ys = [], []
        for k in range(n):
            task = self.tasks[k % len(self.tasks)]
            ds, i, _ = self.rng.choice(task)
            x, y = ds[i]
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)
