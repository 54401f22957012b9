"""Shared pieces of the benchmark suite: shape sets, masks, byte floors, timing, machine info.

Byte accounting (DESIGN.md section 5). For a masked step over ``K`` selected entries of ``N``:

- ``compact_bytes``: ``K * (4 idx + e g read + e p read + e p write + 16 m,v read+write)``, ``e`` the
  parameter's element size (4 for fp32: 32 B per entry);
- ``floor_bytes_<line>``: memory moves in lines (64 B CPU cache lines, 32 B GPU sectors), so the
  gathers from the dense grad/param cost whole lines: ``touched_lines * line_bytes * 3`` (read g,
  read p, write p) ``+ K * 20`` (int32 index, fp32 m and v read and written), where
  ``touched_lines`` counts exactly ``unique(idx // (line_bytes // e))`` per tensor;
- ``dense_bytes``: what a dense baseline must move, ``N * 40`` for fp32 (mask multiply: read g and
  mask, write g; fused AdamW: read p, g, m, v, write p, m, v), ``N * (3e + 3e + 24)`` in general
  (mask in the param dtype, fp32 state).
"""
from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch

#: Shape sets: the c_fc weights of the model each is named after (visual tower, then text tower).
SHAPE_SETS: dict[str, list[tuple[int, int]]] = {
    # the c_fc weights of tests.utils.tiny_open_clip (2 visual blocks of width 64, 2 text of 32)
    "tiny": [(256, 64)] * 2 + [(128, 32)] * 2,
    "vitb16": [(3072, 768)] * 12 + [(2048, 512)] * 12,
    "vitl14": [(4096, 1024)] * 24 + [(3072, 768)] * 12,
}
#: open_clip model whose c_fc weights have exactly the shape set's shapes (for scored masks).
SHAPE_SET_MODEL = {"tiny": "tiny", "vitb16": "ViT-B-16", "vitl14": "ViT-L-14"}

LINE_BYTES = {"cpu": 64, "cuda": 32}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def touched_lines(idx: torch.Tensor, elem_bytes: int, line_bytes: int) -> int:
    """Exactly ``unique(idx // (line_bytes // elem_bytes)).numel()`` for a sorted index list."""
    if idx.numel() == 0:
        return 0
    q = idx.to(torch.int64) // max(1, line_bytes // elem_bytes)
    return int((q[1:] != q[:-1]).sum()) + 1  # sorted, so unique == run starts


@dataclass
class MaskStats:
    n: int
    k: int
    lines: dict[int, int] = field(default_factory=dict)  # line_bytes -> touched lines (all tensors)
    total_lines: dict[int, int] = field(default_factory=dict)  # line_bytes -> lines of the tensors


def mask_stats(shapes, idxs, elem_bytes: int) -> MaskStats:
    st = MaskStats(n=sum(math.prod(s) for s in shapes), k=sum(i.numel() for i in idxs))
    for lb in (64, 32):
        st.lines[lb] = sum(touched_lines(i.cpu(), elem_bytes, lb) for i in idxs)
        per = max(1, lb // elem_bytes)
        st.total_lines[lb] = sum(-(-math.prod(s) // per) for s in shapes)
    return st


def step_bytes(st: MaskStats, elem_bytes: int) -> dict[str, int]:
    return {
        "compact_bytes": st.k * (4 + 3 * elem_bytes + 16),
        "floor_bytes_cpu64": st.lines[64] * 64 * 3 + st.k * 20,
        "floor_bytes_gpu32": st.lines[32] * 32 * 3 + st.k * 20,
        "dense_bytes": st.n * (6 * elem_bytes + 16),  # = N * 40 for fp32
        "touched_lines_64": st.lines[64],
        "touched_lines_32": st.lines[32],
        "touched_frac_64": st.lines[64] / max(1, st.total_lines[64]),
        "touched_frac_32": st.lines[32] / max(1, st.total_lines[32]),
    }


def floor_key(device: torch.device | str) -> str:
    return "floor_bytes_gpu32" if torch.device(device).type == "cuda" else "floor_bytes_cpu64"


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Sum of the bytes of every tensor in ``opt.state`` (views counted by their own size)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------
def random_masks(shapes, density: float, seed: int = 0) -> list[torch.Tensor]:
    """Uniformly random ``floor(density * numel)`` sorted int32 indices per tensor."""
    from fastmask import num_selected

    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        n = math.prod(s)
        k = num_selected(density, n)
        out.append(torch.sort(torch.randperm(n, generator=g)[:k]).values.to(torch.int32))
    return out


def build_clip(name: str, seed: int = 0):
    """An open_clip CLIP with random init (nothing downloaded); ``"tiny"``: tests.utils.tiny_open_clip."""
    import fastmask.compat

    fastmask.compat.patch_torchvision()
    if name == "tiny":
        from tests.utils import tiny_open_clip

        return tiny_open_clip(seed)
    import logging

    import open_clip

    torch.manual_seed(seed)
    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded": intended
    return open_clip.create_model(name, pretrained=None)


def clip_random_batches(model, n: int, batch: int, seed: int = 0):
    """Random images (Gaussian) and random token ids of the model's input sizes."""
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    ctx = model.context_length
    vocab = model.vocab_size
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(1, vocab, (batch, ctx), generator=g))
            for _ in range(n)]


def model_scores(shape_set: str, batches: int = 2, batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """``fastmask.score`` (mode "grad", CLIP contrastive loss) of the c_fc weights of a randomly
    initialised open_clip model whose c_fc shapes are the shape set's, on random images/captions;
    returned in the shape set's order (visual blocks, then text blocks)."""
    import fastmask
    from tests.utils import clip_loss

    model = build_clip(SHAPE_SET_MODEL[shape_set], seed)
    data = clip_random_batches(model, batches, batch, seed)
    scores = fastmask.score(model, data, clip_loss, mode="grad", progress=False)
    out = list(scores.values())
    got = [tuple(s.shape) for s in out]
    if got != [tuple(s) for s in SHAPE_SETS[shape_set]]:
        raise RuntimeError(f"scored model {SHAPE_SET_MODEL[shape_set]} has c_fc shapes {got}, "
                           f"not the {shape_set} set's")
    del model
    gc.collect()
    return out


def select_masks(scores: list[torch.Tensor], density: float) -> list[torch.Tensor]:
    import fastmask

    ms = fastmask.select({str(i): s for i, s in enumerate(scores)}, density)
    return [ms[str(i)].indices for i in range(len(scores))]


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def run_timed(benchmark, fn, device, case_time: float, min_rounds: int = 3, max_rounds: int = 100):
    """Time ``fn`` with pytest-benchmark: two untimed warm-up calls (the second sizes the run), then as
    many rounds as fit in ``case_time`` seconds (at least ``min_rounds``). On a GPU the timed
    function synchronizes before it returns, and each round's setup synchronizes before it starts."""
    dev = torch.device(device)

    def timed():
        fn()
        sync(dev)

    def setup():
        sync(dev)

    if getattr(benchmark, "disabled", False):
        # --benchmark-disable: pytest-benchmark runs the function once; nothing to size
        return benchmark(timed)
    timed()  # warm-up: lazy state (optimizer state, caches, first-touch page faults)
    t0 = time.perf_counter()
    timed()
    once = time.perf_counter() - t0
    rounds = int(min(max_rounds, max(min_rounds, case_time / max(once, 1e-6))))
    return benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)


def mean_time(benchmark, field: str = "mean") -> float | None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    inner = getattr(stats, "stats", stats)
    try:
        return float(getattr(inner, field))
    except (AttributeError, statistics.StatisticsError, TypeError, ValueError):
        return None


def record_rate(benchmark, bytes_key: str, gbps_key: str = "gbps") -> None:
    """After the timed run: ``extra_info[gbps_key] = extra_info[bytes_key] / mean time / 1e9``,
    and ``<gbps_key>_median`` from the median time (robust to a noisy, shared machine)."""
    b = benchmark.extra_info.get(bytes_key)
    for field, key in (("mean", gbps_key), ("median", gbps_key + "_median")):
        t = mean_time(benchmark, field)
        if t and b is not None:
            benchmark.extra_info[key] = b / t / 1e9
            benchmark.extra_info[field + "_s"] = t


# ------------------------------------------------------------------------------------------------
# machine
# ------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | None = None) -> dict:
    import fastmask

    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastmask": fastmask.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info
