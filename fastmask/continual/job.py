"""The continual fine-tuning loop: for each seed, learning rate and method, teach the tasks in turn.

Per task (an ordinary open_clip training loop, see :func:`train_sequence`):

1. the method sets up the task (:func:`.methods.setup_task`): for SPU, score the c_fc weights on
   a quarter of an epoch of the task's batches (``spu-original`` with the original code's loss,
   accumulation and stop rule, :class:`.methods.Scoring`), select 10% per tensor, build the optimizer;
2. train for ``epochs`` epochs with the contrastive loss between images and their class prompts
   (plus a few replayed samples of earlier tasks per batch, with ``replay > 0``);
3. evaluate by zero-shot classification: the new task (with its own prompts, and among all classes
   seen so far), every earlier task, and the control set (generic knowledge).

Memory. On CUDA: ``torch.cuda.max_memory_allocated`` during the task's training, minus what was
allocated before it. On the CPU there is no allocator statistic; the job reports the *peak
resident set size increase* during training, sampled from ``/proc/self/statm`` after every
backward pass (when gradients and optimizer state are alive), relative to the RSS before the
task. It is coarse (glibc keeps freed memory; the first method to run pays for warm-up) and near
zero for the embedded model; the deterministic measures are ``opt_state_bytes`` (the optimizer's
state tensors) and ``grad_bytes`` (the gradients alive after ``backward``).
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from . import checks
from . import data as D
from . import methods as Mth
from . import model as Mdl
from .checks import ConfigError, MissingDependency  # noqa: F401  (re-exported for callers)


@dataclass
class JobConfig:
    """Everything that determines a run. ``None`` fields take the embedded or real-data default
    (:func:`resolve`); the command line maps one flag to each field (``--score-fraction`` for
    ``score_fraction``...)."""

    out: str = "outputs/continual"
    methods: tuple[str, ...] = Mth.DEFAULT_METHODS
    seeds: tuple[int, ...] = (0,)
    lrs: tuple[float, ...] | None = None  # None: (lr,)
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    epochs: int | None = None
    density: float = 0.1
    score_fraction: float | None = None  # of an epoch, for scoring (default 0.25: the original work's quarter)
    score_batches: int | None = None  # instead of score_fraction
    score_loss: str | None = None  # None: each method's own (methods.SCORING); else for every SPU method
    score_accumulate: str | None = None
    score_stop: str | None = None
    replay: int = 0  # samples per earlier task kept in the buffer (0: no replay)
    replay_batch: int | None = None  # replayed samples per batch (default: a quarter of the batch)
    device: str = "cpu"
    amp: bool = False
    fused: bool = False  # fused=True for every optimizer (default: PyTorch's default implementation)
    threads: int | None = None
    workers: int = 0
    progress: bool | str = "auto"  # "auto": progress bars only when stderr is a terminal
    plots: bool = True
    save_masks: bool = True
    # Real use.
    model: str | None = None
    pretrained: str | None = None
    data: str | None = None
    control: str | None = None
    tasks: int | None = None  # default 2
    # The embedded default (None: the defaults below).
    pretrain_epochs: int | None = None
    pretrain_lr: float | None = None
    pretrain_seed: int | None = None
    cache_dir: str | None = None
    limit_per_class: int | None = None  # tests: keep this many digit images per class
    max_steps: int | None = None  # tests: at most this many training steps per task

    @property
    def embedded(self) -> bool:
        return self.data is None


# Calibrated for the embedded default (small CLIP on digits, 2 CPU cores).
EMBEDDED_DEFAULTS = dict(lr=1e-3, weight_decay=0.2, batch_size=32, epochs=30, pretrain_epochs=100, pretrain_lr=2e-3,
                         pretrain_seed=0)
# The original work's values for real data (AdamW lr 7.5e-6, weight decay 0.2, batch 128); the
# number of epochs per task is this job's choice.
REAL_DEFAULTS = dict(lr=7.5e-6, weight_decay=0.2, batch_size=128, epochs=10, tasks=2)
SCORE_FRACTION = 0.25
#: The base model is "near chance" on the control set below chance + this share of (1 - chance).
NEAR_CHANCE_MARGIN = 0.1


def resolve(cfg: JobConfig) -> JobConfig:
    """Fill the ``None`` fields with the defaults of the embedded benchmark or of real data, and
    check every value (:class:`ConfigError` names the flag). Touches no file, device or model:
    :func:`run` calls :func:`.checks.preflight` for those."""
    checks.check_mode(cfg)
    if cfg.lr is not None and cfg.lrs is not None and tuple(cfg.lrs) != (cfg.lr,):
        raise ConfigError("--lr", "give --lr or --lrs, not both")
    if cfg.score_fraction is not None and cfg.score_batches is not None:
        raise ConfigError("--score-batches", "give --score-batches or --score-fraction, not both")
    defaults = EMBEDDED_DEFAULTS if cfg.embedded else REAL_DEFAULTS
    for k, v in defaults.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.score_fraction is None and cfg.score_batches is None:
        cfg.score_fraction = SCORE_FRACTION
    if cfg.lrs is None:
        cfg.lrs = (cfg.lr,)
    cfg.methods, cfg.seeds, cfg.lrs = tuple(cfg.methods), tuple(cfg.seeds), tuple(cfg.lrs)
    checks.check_values(cfg)
    if cfg.replay_batch is None and cfg.replay > 0:
        cfg.replay_batch = max(1, cfg.batch_size // 4)
    if cfg.threads is None and cfg.embedded and cfg.device == "cpu":
        cfg.threads = 1  # the small model gains nothing from intra-op threads, and loses much on a busy machine
    if not isinstance(cfg.progress, bool):
        cfg.progress = {"always": True, "never": False}.get(cfg.progress, _stderr_is_terminal())
    return cfg


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, not current: coarse


class _Memory:
    """Peak memory increase during a task's training (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            self.base = _rss_bytes()
        self.peak = self.base
        self.device = device

    def sample(self) -> None:
        if not self.cuda:
            self.peak = max(self.peak, _rss_bytes())

    def delta_mb(self) -> float:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated(self.device)
        return (self.peak - self.base) / 2**20


@dataclass
class Context:
    """What every method run shares: the benchmark, the base model's weights, the tokenizer."""

    bench: D.Benchmark
    base_model: torch.nn.Module  # frozen, never trained: the template of every run
    build: callable  # () -> a fresh copy of the base model
    tokenizer: callable
    info: dict = field(default_factory=dict)


def prepare(cfg: JobConfig, log=print) -> Context:
    """Build the benchmark and the base model (pretraining the embedded one if not cached)."""
    device = torch.device(cfg.device)
    if cfg.embedded:
        bench = D.digits_benchmark(limit_per_class=cfg.limit_per_class)
        tok = Mdl.WordTokenizer(D.prompts(bench.class_names + bench.control_names))
        model, pre = Mdl.pretrain_tiny_clip(
            bench, tok, seed=cfg.pretrain_seed, epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr,
            cache_dir=cfg.cache_dir, device=device, progress=cfg.progress, log=log)
        info = dict(model="small open_clip CLIP " + str(Mdl.TINY_CLIP), tokenizer="word-level over the prompts",
                    pretrain=pre)
    else:
        model, train_tf, eval_tf, tok = Mdl.load_open_clip(cfg.model, cfg.pretrained, device)
        bench = D.folder_benchmark(cfg.data, cfg.control, cfg.tasks, train_tf, eval_tf)
        info = dict(model=cfg.model, pretrained=cfg.pretrained, tokenizer=f"open_clip.get_tokenizer({cfg.model!r})")
    template = model.eval()
    for p in template.parameters():
        p.requires_grad_(False)

    def build():
        """A fresh copy of the base model, every parameter trainable (methods freeze what they do not train)."""
        m = copy.deepcopy(template)
        for p in m.parameters():
            p.requires_grad_(True)
        return m.train()

    info["benchmark"] = bench.describe()
    return Context(bench, template, build, tok, info)


@dataclass
class _Dist:
    """This process's place in a ``torchrun`` launch (world 1: an ordinary single-process run)."""

    rank: int = 0
    world: int = 1
    owned: bool = False  # this job initialized the process group (and tears it down)
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


_DIST = _Dist()


def _init_distributed(cfg: JobConfig) -> _Dist:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group (nccl on CUDA, gloo on the
    CPU), pin the local GPU; checks ``--batch-size`` first, so nothing starts on a bad split."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if cfg.batch_size % world:
        raise ConfigError("--batch-size", f"{cfg.batch_size} is the global batch; under torchrun it is split "
                          f"evenly across the {world} processes, so it must be a multiple of {world}")
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        device = torch.device(cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), owned=owned, backend=dist.get_backend())


def _loader(ds, cfg: JobConfig, shuffle: bool, seed: int = 0, batch_size: int | None = None):
    """Evaluation loaders (``shuffle=False``) see all data on every process; training and scoring
    loaders (``shuffle=True``) under torchrun take this process's shard of each epoch (a
    ``DistributedSampler``) in batches of ``batch_size / world``: the global batch is unchanged."""
    bs = batch_size or cfg.batch_size
    if shuffle and _DIST.world > 1:
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=_DIST.world, rank=_DIST.rank, shuffle=True,
                                                      seed=seed, drop_last=len(ds) >= _DIST.world)
        bs //= _DIST.world
        return torch.utils.data.DataLoader(ds, batch_size=bs, sampler=sampler, drop_last=len(sampler) >= bs,
                                           num_workers=cfg.workers)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=shuffle, generator=g,
                                       drop_last=shuffle and len(ds) >= bs, num_workers=cfg.workers)


def evaluate(model, ctx: Context, cfg: JobConfig, t: int, eval_loaders: dict, autocast) -> dict:
    """Zero-shot accuracies after task ``t`` (``t = -1``: the base model before any task)."""
    bench, tok, device = ctx.bench, ctx.tokenizer, torch.device(cfg.device)

    def acc(loader, class_ids, names=None):
        names = names if names is not None else [bench.class_names[c] for c in class_ids]
        return Mdl.zero_shot_accuracy(model, loader, tok(D.prompts(names)), class_ids, device, autocast)

    out = dict(control=acc(eval_loaders["control"], list(range(len(bench.control_names))), bench.control_names))
    out["tasks_own"] = [acc(eval_loaders[j], bench.tasks[j]) for j in range(len(bench.tasks))]
    if t >= 0:
        seen = bench.seen(t)
        out["new_own"] = out["tasks_own"][t]
        out["new_seen"] = acc(eval_loaders[t], seen)
        out["seen_all"] = acc(eval_loaders["seen", t], seen)
    return out


def _scoring_loss(scoring: Mth.Scoring | None, lookup: torch.Tensor, captions: torch.Tensor, device, autocast):
    """The loss ``fastmask.score`` differentiates for a method's scoring (None: no scoring)."""
    if scoring is None:
        return None
    fn = Mdl.contrastive_loss if scoring.loss == "contrastive" else Mdl.l2_logits_loss

    def loss_fn(model, batch):
        images, labels = batch
        with autocast() if autocast else contextlib.nullcontext():
            return fn(model, images.to(device), lookup[labels].to(device), captions).float()

    return loss_fn


def train_sequence(method: str, lr: float, seed: int, ctx: Context, cfg: JobConfig, eval_loaders: dict,
                   model=None, log=print, before: dict | None = None) -> tuple[dict, list]:
    """Teach every task in turn with one method; returns (the run's record, the masks per task).

    ``model`` defaults to a fresh copy of the base model; it is trained in place. ``before`` is the
    base model's evaluation (computed here when not given).
    """
    from tqdm.auto import tqdm

    bench, tok, device = ctx.bench, ctx.tokenizer, torch.device(cfg.device)
    random.seed(seed)
    torch.manual_seed(seed)
    model = model if model is not None else ctx.build()
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.amp else None
    if before is None:
        before = evaluate(model, ctx, cfg, -1, eval_loaders, autocast)
    scoring = Mth.scoring_for(method, cfg.score_loss, cfg.score_accumulate, cfg.score_stop)
    record = dict(method=method, lr=None if method == "frozen" else lr, seed=seed, before=before, tasks=[],
                  scoring=None if scoring is None else asdict(scoring))
    replay = D.ReplayBuffer(cfg.replay, seed=seed)
    all_masks = []
    best = list(before["tasks_own"])  # best accuracy so far per task, for forgetting
    for t, task in enumerate(bench.tasks):
        train_ds = D.subset(bench.train, task)
        classes = sorted(set(task) | set(replay.classes))
        captions = tok(D.prompts([bench.class_names[c] for c in classes])).to(device)
        lookup = torch.full((len(bench.class_names),), -1, dtype=torch.long)
        lookup[torch.as_tensor(classes)] = torch.arange(len(classes))

        def loss_fn(model, batch):
            images, labels = batch
            with autocast() if autocast else contextlib.nullcontext():
                return Mdl.contrastive_loss(model, images.to(device), lookup[labels].to(device), captions).float()

        loader = _loader(train_ds, cfg, shuffle=True, seed=seed * 1000 + t)
        score_loader = _loader(train_ds, cfg, shuffle=True, seed=seed * 1000 + t + 500)
        n_score, n_extra = (scoring.batches(len(score_loader), cfg.score_fraction, cfg.score_batches)
                            if scoring is not None else (0, None))
        score_fn = _scoring_loss(scoring, lookup, captions, device, autocast)
        scored = []
        t0 = time.perf_counter()
        setup = Mth.setup_task(
            method, model, score_loader, (lambda m, b: scored.append(1) or score_fn(m, b)) if score_fn else loss_fn,
            lr=lr, weight_decay=cfg.weight_decay, density=cfg.density, score_batches_n=max(1, n_score),
            progress=cfg.progress, scoring=scoring, max_extra_batches=n_extra, fused=True if cfg.fused else None)
        score_s = time.perf_counter() - t0
        all_masks.append(setup.masks)

        steps, step_s, g_bytes, opt_bytes = 0, 0.0, 0, 0
        mem = _Memory(device)
        if setup.optimizer is not None:
            model.train()
            trained = _ddp(model, setup.optimizer, device) if _DIST.world > 1 else model
            total = cfg.epochs * len(loader)
            if cfg.max_steps is not None:
                total = min(total, cfg.max_steps)
            bar = tqdm(total=total, desc=f"seed {seed} lr {lr:g} {method}: task {t + 1}/{len(bench.tasks)}",
                       unit="step", disable=not cfg.progress, leave=False)
            for epoch in range(cfg.epochs):
                if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
                    loader.sampler.set_epoch(epoch)
                for images, labels in loader:
                    if steps >= total:
                        break
                    extra = replay.sample(cfg.replay_batch or 0)
                    if extra is not None:
                        images, labels = torch.cat([images, extra[0]]), torch.cat([labels, extra[1]])
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    s0 = time.perf_counter()
                    loss = loss_fn(trained, (images, labels))
                    setup.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    mem.sample()
                    if steps == 0:
                        g_bytes = Mth.grad_bytes(model)
                    setup.before_step()
                    setup.optimizer.step()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    step_s += time.perf_counter() - s0
                    steps += 1
                    bar.update()
                    if cfg.progress:
                        bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.close()
            opt_bytes = Mth.state_bytes(setup.optimizer)
            del setup.optimizer, trained
        replay.add_task(train_ds)

        ev = evaluate(model, ctx, cfg, t, eval_loaders, autocast)
        previous = [best[j] - ev["tasks_own"][j] for j in range(t)]
        best = [max(b, a) if j <= t else b for j, (b, a) in enumerate(zip(best, ev["tasks_own"]))]
        row = dict(
            task=t + 1, classes=[bench.class_names[c] for c in task], **ev,
            control_drop=before["control"] - ev["control"],
            forgetting=(sum(previous) / len(previous)) if previous else None,
            steps=steps, step_ms=1000 * step_s / steps if steps else None, score_s=score_s,
            score_batches=len(scored),
            opt_state_bytes=opt_bytes, grad_bytes=g_bytes, peak_mem_delta_mb=mem.delta_mb() if steps else None,
            selected=setup.masks.k if setup.masks is not None else None,
        )
        record["tasks"].append(row)
        timing = f"{row['step_ms']:.1f} ms/step" if steps else "no training"
        scored_on = f", scored on {len(scored)} batch{'es' if len(scored) > 1 else ''}" if scored else ""
        log(f"  seed {seed} lr {lr:g} {method:12s} task {t + 1}: new {ev['new_own']:.3f} (among seen "
            f"{ev['new_seen']:.3f}), control {ev['control']:.3f} ({-row['control_drop'] + 0.0:+.3f}), {timing}{scored_on}")
    for p in model.parameters():
        p.requires_grad_(True)
    return record, all_masks


def _ddp(model, optimizer, device):
    """``model`` in DistributedDataParallel for one task (after the method froze what it does not
    train). With ``MaskedAdamW`` the gradient all-reduce sends only the selected entries of the
    masked weights (:func:`fastmask.distributed.masked_allreduce_hook`)."""
    import fastmask
    from fastmask.distributed import MaskedAllreduceState, masked_allreduce_hook

    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if isinstance(optimizer, fastmask.MaskedAdamW):
        ddp.register_comm_hook(MaskedAllreduceState(optimizer), masked_allreduce_hook)
    return ddp


def summarize(record: dict) -> dict:
    """One run's headline numbers after the last task."""
    rows = record["tasks"]
    last = rows[-1]
    steps = sum(r["steps"] for r in rows)
    return dict(
        new_acc=sum(r["new_own"] for r in rows) / len(rows),  # each task right after learning it
        new_seen_acc=sum(r["new_seen"] for r in rows) / len(rows),
        final_tasks_acc=sum(last["tasks_own"]) / len(last["tasks_own"]),
        final_seen_acc=last["seen_all"],
        control=last["control"],
        control_drop=last["control_drop"],
        forgetting=last["forgetting"],
        step_ms=(sum(r["step_ms"] * r["steps"] for r in rows if r["steps"]) / steps) if steps else None,
        opt_state_bytes=max(r["opt_state_bytes"] for r in rows),
        grad_bytes=max(r["grad_bytes"] for r in rows),
        peak_mem_delta_mb=max((r["peak_mem_delta_mb"] for r in rows if r["peak_mem_delta_mb"] is not None), default=None),
        score_batches=(sum(r["score_batches"] for r in rows) / len(rows)) if any(r["score_batches"] for r in rows) else None,
    )


def base_model_check(before: dict, n_control_classes: int) -> dict:
    """The base model's control accuracy against chance; ``near_chance`` when it is below
    ``chance + NEAR_CHANCE_MARGIN * (1 - chance)`` (the control column then means little)."""
    chance = 1.0 / n_control_classes
    near = before["control"] < chance + NEAR_CHANCE_MARGIN * (1.0 - chance)
    return dict(control=before["control"], chance=chance, near_chance=bool(near), tasks_own=before["tasks_own"])


def run(cfg: JobConfig, log=print) -> dict:
    """Run the whole job and write its outputs; returns the results (also saved as JSON).

    Every setting is checked first (:func:`resolve`, :func:`.checks.preflight`), before any model,
    data or scoring work: :class:`ConfigError` names the flag, :class:`MissingDependency` the pip
    command.
    """
    global _DIST
    cfg = resolve(cfg)
    notes = checks.preflight(cfg)
    _DIST = _init_distributed(cfg)
    try:
        return _run(cfg, notes, log)
    finally:
        if _DIST.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
        _DIST = _Dist()


def _run(cfg: JobConfig, notes: list, log) -> dict:
    from . import report

    if not _DIST.main:  # one voice: rank 0 logs, shows progress and writes the outputs
        log = lambda *a, **k: None  # noqa: E731
        cfg = replace(cfg, progress=False)
    for note in notes:
        log(f"note: {note}")
    if _DIST.world > 1:
        log(f"distributed: {_DIST.world} processes; batches of {cfg.batch_size // _DIST.world} per process "
            f"(global {cfg.batch_size}); every rank scores its shard, the scores are summed across ranks")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    if not _DIST.main:
        _DIST.barrier()  # rank 0 pretrains (or loads) the base model and caches it first
    ctx = prepare(cfg, log=log)
    if _DIST.main:
        _DIST.barrier()
    log(ctx.info["benchmark"])
    bench = ctx.bench
    eval_bs = max(cfg.batch_size, 256) if cfg.embedded else cfg.batch_size
    eval_loaders = {"control": _loader(bench.control, cfg, False, batch_size=eval_bs)}
    for j, task in enumerate(bench.tasks):
        eval_loaders[j] = _loader(D.subset(bench.test, task), cfg, False, batch_size=eval_bs)
        eval_loaders["seen", j] = _loader(D.subset(bench.test, bench.seen(j)), cfg, False, batch_size=eval_bs)

    device = torch.device(cfg.device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.amp else None
    before = evaluate(ctx.base_model, ctx, cfg, -1, eval_loaders, autocast)
    base = base_model_check(before, len(bench.control_names))
    log(f"base model: control accuracy {base['control']:.1%} ({len(bench.control_names)} classes, "
        f"chance {base['chance']:.1%})")
    if base["near_chance"]:
        hint = ("pretrain it longer (--pretrain-epochs, default 100)" if cfg.embedded else
                "check --pretrained and that --control holds classes the model knows")
        warning = (f"the base model's control accuracy ({base['control']:.1%}) is near chance "
                   f"({base['chance']:.1%}): it has little generic knowledge to lose, so the control and "
                   f"forgetting columns say little; {hint}")
        log(f"WARNING: {warning}")
        notes.append(warning)

    runs = []
    for seed in cfg.seeds:
        for lr in cfg.lrs:
            for method in cfg.methods:
                if method == "frozen" and lr != cfg.lrs[0]:
                    continue  # no training: the same at every learning rate
                record, masks = train_sequence(method, lr, seed, ctx, cfg, eval_loaders, log=log, before=before)
                record["summary"] = summarize(record)
                runs.append(record)
                if cfg.save_masks and masks and masks[0] is not None and _DIST.main:
                    mdir = os.path.join(cfg.out, "masks")
                    os.makedirs(mdir, exist_ok=True)
                    for t, m in enumerate(masks):
                        m.save(os.path.join(mdir, f"seed{seed}_lr{lr:g}_{method}_task{t + 1}.safetensors"),
                               metadata={"method": method, "task": str(t + 1), "seed": str(seed)})
    scoring = {m: Mth.scoring_for(m, cfg.score_loss, cfg.score_accumulate, cfg.score_stop) for m in cfg.methods}
    results = dict(
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        info=ctx.info, tasks=[[bench.class_names[c] for c in t] for t in bench.tasks],
        control_classes=bench.control_names, base_model=base, notes=notes,
        scoring={m: dict(asdict(sc), description=sc.describe()) for m, sc in scoring.items() if sc is not None},
        runs=runs, summary=report.aggregate(runs),
        memory_measure=("torch.cuda.max_memory_allocated delta" if device.type == "cuda" else
                        "peak RSS increase during training, sampled after each backward (/proc/self/statm)"),
        wall_s=time.perf_counter() - t_start,
        distributed=dict(world_size=_DIST.world, batch_per_process=cfg.batch_size // _DIST.world,
                         backend=_DIST.backend),
    )
    if _DIST.main:
        report.write(results, cfg.out, plots=cfg.plots, log=log)
    _DIST.barrier()
    return results
