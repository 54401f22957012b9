"""One training step of a Llama-style language model: fastmask vs LoRA vs dense AdamW; set-up shared
by ``test_lm_step.py`` and its memory-measuring subprocess::

    python -m bench.lm_step --size 400m --method fastmask_1_bwd --steps 3 --json

runs ONE case in a fresh process and prints one JSON line.

Model: ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` (random init, seed 0, nothing
downloaded), parameters in bf16, SDPA attention, ``use_cache=False``; the loss is the causal-LM loss
of random token ids (fixed seed) as their own labels. Sizes (``SIZES``): ``tiny`` (~1.3M params, CI
smoke), ``small`` (~58M) and ``400m`` (374M: hidden 1024, MLP 2816, 24 layers, 16 heads, vocab
32000, untied embeddings).

Target set: the MLP weights, ``gate_proj``, ``up_proj`` and ``down_proj`` of every layer
(``fastmask.find_targets(model, "hf_llama_mlp")``; the detected preset ``hf_llama`` would leave
``down_proj`` out). Every other parameter is frozen (``requires_grad=False``), except for ``full``.

Methods (all AdamW-type, lr 1e-5, betas (0.9, 0.999), weight decay 0.0):

- ``full``: every parameter trainable, ``torch.optim.AdamW(fused=True)`` (bf16 state, as AdamW
  keeps the state in the parameter's dtype);
- ``adamw_mlp``: the MLP weights trainable, ``AdamW(fused=True)``;
- ``original``: the SPU code's style: the MLP weights trainable, a dense mask in the parameter's
  dtype (bf16; ``torch.zeros_like(p)`` with ones at a 1% random selection, the ``fastmask_1``
  masks) multiplied into each gradient in a Python loop, then ``AdamW(foreach=False)`` with one
  param group per parameter;
- ``lora``: ``peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["gate_proj",
  "up_proj", "down_proj"])`` on the frozen bf16 model (peft's defaults otherwise, so the adapters
  are float32: ``autocast_adapter_dtype=True``), ``AdamW(fused=True)`` on the adapters;
- ``fastmask_1``, ``fastmask_10``: ``fastmask.MaskedAdamW`` on the MLP weights with masks of 1% /
  10% of each tensor from ``fastmask.select`` on **random** scores (uniform, seeded; masks are not
  what is measured here, and scoring a 374M model would only add set-up time);
- ``fastmask_1_bwd``, ``fastmask_10_bwd``: the same with ``step_in_backward=True`` (each parameter
  is stepped from a post-accumulate-grad hook inside ``loss.backward()`` and its gradient freed;
  ``opt.step()`` is then a no-op). Skipped (exit code 3 from the CLI) when the installed
  ``MaskedAdamW`` has no such keyword;
- ``fastmask_1_bwd_sampled``: ``fastmask_1_bwd`` under ``fastmask.sampled_weight_grads(model, opt)``:
  the MLP layers compute their weight gradients at the selected entries only
  (``fastmask.ops.sampled_weight_grad``) instead of the whole ``grad_out.T @ input``.

Memory, per case in a fresh process: ``rss_imports`` is the resident set after importing torch,
transformers, peft and fastmask (the same for every method); ``rss_setup`` after the model, data,
masks and optimizer are built (after ``gc.collect()`` and glibc's ``malloc_trim(0)``, so that
freed set-up transients do not count); the peak is ``VmHWM`` of /proc/self/status, **reset to the current
RSS right after set-up** (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), so ``peak_rss`` is
the largest resident set during the warm-up and timed steps, not a transient of model construction
or mask selection (``peak_rss_lifetime`` is kept too; ``hwm_reset`` says whether the reset
worked). On CUDA also ``torch.cuda.max_memory_allocated`` over the steps (stats reset after
set-up). ``grad_bytes`` is the largest sum of ``.grad`` bytes held right after ``backward()``
(0 with the step in backward: each gradient is freed as soon as its parameter is stepped).
``opt_state_bytes``: the bytes of every tensor in ``optimizer.state``. Time per step: every
step's wall time (forward, backward, mask multiply where there is one, optimizer step), the
first one (the warm-up, which creates the optimizer state) excluded.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import sys
import time

import torch

METHODS = ("full", "adamw_mlp", "original", "lora", "fastmask_1", "fastmask_10", "fastmask_1_bwd",
           "fastmask_10_bwd", "fastmask_1_bwd_sampled")
SIZES = {
    # name: (LlamaConfig fields, batch, sequence length)
    "tiny": (dict(vocab_size=2000, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4), 2, 32),
    "small": (dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=8), 1, 128),
    "400m": (dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=16), 1, 128),
}
LR, WD = 1e-5, 0.0
ORIGINAL_DENSITY = 0.01
LORA_R, LORA_ALPHA = 16, 32
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
SKIP_EXIT = 3  # CLI exit code: this method is not available in the installed fastmask


def density_of(method: str) -> float | None:
    if method.startswith("fastmask_"):
        return int(method.split("_")[1]) / 100
    if method == "original":
        return ORIGINAL_DENSITY
    return None


def step_in_backward_available() -> bool:
    import fastmask

    return "step_in_backward" in inspect.signature(fastmask.MaskedAdamW.__init__).parameters


def unavailable(method: str) -> str | None:
    """Why ``method`` cannot run here, or None."""
    if "_bwd" in method and not step_in_backward_available():
        return "fastmask.MaskedAdamW has no step_in_backward keyword in this checkout"
    if method == "lora":
        try:
            import_hf()
            import peft  # noqa: F401
        except ImportError:
            return "peft is not installed (pip install peft)"
    return None


def import_hf():
    """transformers (and peft where installed), after fastmask's torchvision patch."""
    import fastmask.compat

    fastmask.compat.patch_torchvision()
    import transformers

    try:
        import peft  # noqa: F401  (imported for every method, so that rss_imports is comparable)
    except ImportError:
        pass
    return transformers


def build_model(size: str, seed: int = 0):
    transformers = import_hf()
    fields, _, seq = SIZES[size]
    cfg = transformers.LlamaConfig(**fields, max_position_embeddings=max(256, seq), tie_word_embeddings=False,
                                   use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    # built directly in bf16 (no fp32 copy at any point)
    model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.train()
    return model


def random_masks(targets: dict[str, torch.nn.Parameter], density: float, seed: int = 0):
    """``fastmask.select`` per tensor on uniform random scores (one tensor's scores alive at a time)."""
    import fastmask

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in targets.items():
        scores = torch.rand(p.shape, generator=g)
        out[name] = fastmask.select({name: scores}, density)[name]
        del scores
    return fastmask.MaskSet(out)


class Case:
    """Model, data and optimizer of one method; ``step()`` runs one training step.

    ``keep_initial=True`` keeps a copy of the MLP weights and the masks (for :meth:`check`);
    otherwise the ``MaskSet`` is dropped once the optimizer (which copies the indices) is built."""

    def __init__(self, size: str, method: str, device: str = "cpu", keep_initial: bool = False,
                 lr: float = LR):
        import fastmask

        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        if size not in SIZES:
            raise ValueError(f"size: expected one of {tuple(SIZES)}, got {size!r}")
        why = unavailable(method)
        if why:
            raise RuntimeError(f"{method}: {why}")
        self.size, self.method, self.device = size, method, torch.device(device)
        _, self.batch, self.seq = SIZES[size]
        model = build_model(size).to(self.device)
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, model.config.vocab_size, (self.batch, self.seq), generator=g).to(self.device)
        targets = fastmask.find_targets(model, "hf_llama_mlp")
        self.mlp = dict(targets.masked)  # name -> parameter (of the base model, also under LoRA)
        self.n_masked = sum(p.numel() for p in self.mlp.values())
        self.n_params = sum(p.numel() for p in model.parameters())
        self.initial = {n: p.detach().clone() for n, p in self.mlp.items()} if keep_initial else None
        density = density_of(method)
        self.masks = random_masks(self.mlp, density) if density else None
        self.k = self.masks.k if self.masks is not None else None
        self.dense_masks: list[torch.Tensor] = []
        self.step_in_backward = "_bwd" in method
        if method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WD, fused=True)
        elif method == "lora":
            import peft

            cfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                  target_modules=list(MLP_MODULES), bias="none")
            model = peft.get_peft_model(model, cfg)
            self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                         weight_decay=WD, fused=True)
        else:
            fastmask.freeze(model, targets)
            params = targets.parameters()
            if method == "adamw_mlp":
                self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=WD, fused=True)
            elif method == "original":
                for n, p in self.mlp.items():
                    m = torch.zeros_like(p)
                    m.view(-1)[self.masks[n].indices.to(self.device).long()] = 1
                    self.dense_masks.append(m)
                self.opt = torch.optim.AdamW([{"params": [p]} for p in params], lr=lr, weight_decay=WD,
                                             foreach=False)
            else:
                kw = dict(step_in_backward=True) if self.step_in_backward else {}
                self.opt = fastmask.MaskedAdamW(params, lr=lr, weight_decay=WD, masks=self.masks, model=model, **kw)
                if method.endswith("_sampled"):
                    self.sampled = fastmask.sampled_weight_grads(model, self.opt)  # for the life of the case
        if not keep_initial:
            # the optimizer holds its own copy of the indices (MaskedAdamW) or the dense masks
            # (original): a training loop need not keep the MaskSet, so it is not counted
            self.masks = None
        self.model = model
        self.trainable_params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.trainable_params)
        self.grad_bytes = 0
        self.loss: float | None = None

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.grad_bytes = max(self.grad_bytes, sum(p.grad.numel() * p.grad.element_size()
                                                   for p in self.trainable_params if p.grad is not None))
        if self.method == "original":
            for p, m in zip(self.mlp.values(), self.dense_masks):
                p.grad.mul_(m)
        self.opt.step()
        self.loss = loss.detach()
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def state_bytes(self) -> int:
        total = 0
        for st in self.opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        return total

    def check(self) -> dict:
        """What the steps did to the MLP weights (needs ``keep_initial=True``): per kind of entry
        (selected / unselected by this method's mask; all entries without one) how many changed."""
        if self.initial is None:
            raise RuntimeError("check() needs Case(..., keep_initial=True)")
        out = dict(changed_selected=0, changed_unselected=0, changed=0, selected=0, total=0)
        for n, p in self.mlp.items():
            diff = (p.detach() != self.initial[n]).view(-1)
            out["changed"] += int(diff.sum())
            out["total"] += diff.numel()
            if self.masks is not None:
                sel = torch.zeros_like(diff)
                sel[self.masks[n].indices.to(diff.device).long()] = True
                out["changed_selected"] += int((diff & sel).sum())
                out["changed_unselected"] += int((diff & ~sel).sum())
                out["selected"] += int(sel.sum())
        return out


# ------------------------------------------------------------------------------------------------
# memory of this process
# ------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def peak_rss_kib() -> int:
    """``VmHWM`` (``ru_maxrss`` would not do: Linux carries it across ``execve``)."""
    v = _status_kib("VmHWM")
    return v if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def trim_heap() -> bool:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``), so that
    the RSS after set-up counts live memory, not the transients of model construction and mask
    selection that glibc keeps (its mmap threshold grows with freed large blocks)."""
    import ctypes
    import gc

    gc.collect()
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def run(size: str, method: str, device: str = "cpu", steps: int = 3, lr: float = LR) -> dict:
    import_hf()
    import fastmask  # noqa: F401

    torch.manual_seed(0)
    trim_heap()
    rss_imports = rss_kib()
    lifetime_before = peak_rss_kib()
    case = Case(size, method, device, lr=lr)
    trimmed = trim_heap()
    rss_setup = rss_kib()
    setup_peak = peak_rss_kib()
    reset = reset_peak_rss()
    cuda = case.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        cuda_setup = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 1):  # one warm-up step (creates optimizer state)
        t0 = time.perf_counter()
        case.step()
        times.append(time.perf_counter() - t0)
    peak = peak_rss_kib()
    out = {
        "size": size, "method": method, "device": str(case.device), "dtype": "bf16",
        "batch": case.batch, "seq": case.seq, "lr": lr, "weight_decay": WD,
        "density": density_of(method), "step_in_backward": case.step_in_backward,
        "params": case.n_params, "trainable": case.trainable, "N_masked": case.n_masked, "K": case.k,
        "rss_imports_kib": rss_imports,
        "rss_setup_kib": rss_setup,
        "peak_rss_kib": peak,  # over the steps (VmHWM reset after set-up) if hwm_reset
        "peak_rss_lifetime_kib": max(peak, setup_peak, lifetime_before),
        "hwm_reset": reset,
        "heap_trimmed": trimmed,
        "warmup_s": times[0],
        "step_s": times[1:],
        "opt_state_bytes": case.state_bytes(),
        "grad_bytes": case.grad_bytes,
        "loss": float(case.loss) if case.loss is not None else None,
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()),
    }
    if cuda:
        out["cuda_setup_allocated"] = cuda_setup
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return out


def paired(size: str, methods: list[str], rounds: int = 5, device: str = "cpu", lr: float = LR) -> dict:
    """Time per step of several methods in ONE process, their steps interleaved round by round (the
    order rotated every round), so that all see the same machine conditions: the ratios to trust
    on a shared machine. One warm-up step per method first. Returns ``{"step_s": {method: [s,
    ...]}, "median_s": {method: s}, "ratio_vs": {first method: {method: median of the per-round
    time ratios}}}``. Memory is not measured here (the cases share the process)."""
    import statistics

    import_hf()
    methods = [m for m in methods if not unavailable(m)]
    cases = {m: Case(size, m, device, lr=lr) for m in methods}
    for c in cases.values():
        c.step()
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in order:
            t0 = time.perf_counter()
            cases[m].step()
            times[m].append(time.perf_counter() - t0)
    ref = methods[0]
    return {
        "size": size, "methods": methods, "rounds": rounds, "step_s": times,
        "median_s": {m: statistics.median(v) for m, v in times.items()},
        "ratio_vs": {ref: {m: statistics.median(a / b for a, b in zip(times[m], times[ref])) for m in methods}},
        "loadavg": list(os.getloadavg()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="tiny")
    ap.add_argument("--method", choices=METHODS, help="the case to measure (memory and time)")
    ap.add_argument("--paired", default=None,
                    help="instead: comma-separated methods timed interleaved in one process (no memory)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of --paired (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default 3)")
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--json", action="store_true", help="print one JSON line (else a one-line summary)")
    args = ap.parse_args(argv)
    if (args.method is None) == (args.paired is None):
        ap.error("give exactly one of --method and --paired")
    if args.threads:
        torch.set_num_threads(args.threads)
    import_hf()
    if args.paired:
        methods = [m.strip() for m in args.paired.split(",") if m.strip()]
        bad = [m for m in methods if m not in METHODS]
        if bad:
            ap.error(f"--paired: unknown methods {bad}; known: {', '.join(METHODS)}")
        out = paired(args.size, methods, args.rounds, args.device, args.lr)
        json.dump(out, sys.stdout)
        print()
        return 0
    why = unavailable(args.method)
    if why:
        print(f"bench.lm_step: skipped {args.method}: {why}", file=sys.stderr)
        return SKIP_EXIT
    out = run(args.size, args.method, args.device, args.steps, args.lr)
    if args.json:
        json.dump(out, sys.stdout)
        print()
    else:
        import statistics

        print(f"{args.size} {args.method}: peak RSS {out['peak_rss_kib'] / 1024:.0f} MiB "
              f"(set-up {out['rss_setup_kib'] / 1024:.0f}), {1e3 * statistics.median(out['step_s']):.1f} ms/step, "
              f"optimizer state {out['opt_state_bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
