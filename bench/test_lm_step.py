"""One training step (forward, backward, optimizer step) of a randomly initialised bf16 Llama-style
model (``bench/lm_step.py``): full fine-tuning, AdamW on the MLP weights, the SPU code's style
(dense mask multiplied into the MLP gradients + AdamW), LoRA (r=16 on the same MLP modules,
peft), fastmask at 1% and 10% of the MLP weights, and fastmask with the step in backward.

- ``test_lm_step``: one case per method. Time per step in this process (pytest-benchmark); memory
  (peak RSS over the steps, RSS after set-up, on CUDA ``max_memory_allocated``), optimizer-state
  bytes and gradient bytes from a fresh subprocess per case (``python -m bench.lm_step``), in
  ``extra_info``. After the timed steps it checks what cannot be faked: the masked methods changed
  no unselected entry of the MLP weights (bit-equal to their initial values) and some selected
  ones; LoRA left the base weights untouched.
- ``test_lm_step_paired``: LoRA, fastmask 1% with and without the step in backward (and with
  sampled weight gradients) and full fine-tuning timed interleaved in one process (``--paired-rounds`` rounds): the time ratios to
  trust on a shared machine.

The sizes are ``--lm-size`` (default: ``tiny`` with ``--shapes tiny`` alone, else ``400m``, ~7 min
on 2 CPU cores; ``tiny,400m`` for both). With ``--benchmark-disable`` (smoke) only the ``lora`` and ``fastmask_1_bwd`` cases
(``fastmask_1`` where the step in backward is missing) spawn the memory subprocess, with 1 step.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common, lm_step
from bench.conftest import options

ROOT = Path(__file__).resolve().parent.parent
PAIRED = ("lora", "fastmask_1_bwd", "fastmask_1_bwd_sampled", "fastmask_1", "full")


def pytest_generate_tests(metafunc):
    o = options(metafunc.config)
    for s in o.lm_sizes:
        if s not in lm_step.SIZES:
            raise pytest.UsageError(f"--lm-size: unknown size {s!r}; known: {', '.join(lm_step.SIZES)}")
    if "lm_case" in metafunc.fixturenames:
        metafunc.parametrize("lm_case", [pytest.param((size, dev, m), id=f"{size}-{dev}-{m}") for size in o.lm_sizes
                                         for dev in o.devices for m in lm_step.METHODS])
    if "lm_paired" in metafunc.fixturenames:
        metafunc.parametrize("lm_paired", [pytest.param((size, dev), id=f"{size}-{dev}") for size in o.lm_sizes
                                           for dev in o.devices])


def _subprocess(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bench.lm_step", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode not in (0, lm_step.SKIP_EXIT):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    return res


def _memory(size: str, method: str, device: str, steps: int) -> dict | None:
    res = _subprocess(["--size", size, "--method", method, "--device", device, "--steps", str(steps), "--json"])
    if res.returncode == lm_step.SKIP_EXIT:
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def _smoke_memory_methods() -> tuple[str, ...]:
    return ("lora", "fastmask_1_bwd" if lm_step.step_in_backward_available() else "fastmask_1")


def _check(c: lm_step.Case) -> dict:
    """The sanity that cannot be faked; returns the counts for extra_info."""
    got = c.check()
    m = c.method
    if m.startswith("fastmask") or m == "original":
        # exact: weight decay is 0, so the dense mask multiply leaves unselected entries exact too
        assert got["changed_unselected"] == 0, f"{m}: {got['changed_unselected']} unselected MLP entries changed"
        assert got["changed_selected"] > 0, f"{m}: no selected MLP entry changed ({got})"
        assert got["selected"] == c.k
    elif m == "lora":
        assert got["changed"] == 0, f"lora: {got['changed']} entries of the frozen base MLP weights changed"
        lora_b = [p for n, p in c.model.named_parameters() if "lora_B" in n]
        assert lora_b and any(bool(p.detach().ne(0).any()) for p in lora_b), "lora: the adapters did not move"
    else:  # full, adamw_mlp
        assert got["changed"] > 0, f"{m}: no MLP entry changed"
    return got


def test_lm_step(benchmark, lm_case, opts, request):
    size, device, method = lm_case
    why = lm_step.unavailable(method)
    if why:
        pytest.skip(f"{method}: {why}")
    disabled = request.config.getoption("benchmark_disable", False)
    c = lm_step.Case(size, method, device, keep_initial=True)
    info = benchmark.extra_info
    info.update(bench="lm_step", size=size, impl=method, device=device, dtype="bf16", batch=c.batch, seq=c.seq,
                density=lm_step.density_of(method), step_in_backward=c.step_in_backward, params=c.n_params,
                trainable=c.trainable, N=c.n_masked, K=c.k, lr=lm_step.LR, weight_decay=lm_step.WD)
    common.run_timed(benchmark, c.step, device, opts.case_time * 3, min_rounds=3, max_rounds=20)
    info["opt_state_bytes_inproc"] = c.state_bytes()
    t = common.mean_time(benchmark, "median")
    if t:
        info["median_s"] = t
    info["check"] = _check(c)
    del c
    gc.collect()
    if disabled and method not in _smoke_memory_methods():
        return  # smoke run: two memory subprocesses are enough to exercise the path
    mem = _memory(size, method, device, steps=1 if disabled else 3)
    assert mem is not None, f"{method}: the subprocess skipped a method this process has"
    info["subprocess"] = mem
    info["rss_imports_bytes"] = mem["rss_imports_kib"] * 1024
    info["rss_setup_bytes"] = mem["rss_setup_kib"] * 1024
    info["peak_rss_bytes"] = mem["peak_rss_kib"] * 1024
    info["train_rss_bytes"] = (mem["peak_rss_kib"] - mem["rss_setup_kib"]) * 1024
    info["opt_state_bytes"] = mem["opt_state_bytes"]
    info["grad_bytes"] = mem["grad_bytes"]
    info["subprocess_median_s"] = sorted(mem["step_s"])[len(mem["step_s"]) // 2]
    if "cuda_max_allocated" in mem:
        info["cuda_max_allocated_bytes"] = mem["cuda_max_allocated"]
        info["cuda_setup_allocated_bytes"] = mem["cuda_setup_allocated"]
    if mem["opt_state_bytes"] and info["opt_state_bytes_inproc"]:
        assert mem["opt_state_bytes"] == info["opt_state_bytes_inproc"]


def test_lm_step_paired(benchmark, lm_paired, opts, request):
    """The paired (interleaved) time comparison, in a subprocess (the models are freed with it)."""
    size, device = lm_paired
    disabled = request.config.getoption("benchmark_disable", False)
    methods = [m for m in PAIRED if not lm_step.unavailable(m)]
    rounds = 1 if disabled else opts.paired_rounds
    args = ["--size", size, "--paired", ",".join(methods), "--rounds", str(rounds), "--device", device]
    out: dict = {}

    def run():
        out.update(json.loads(_subprocess(args).stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert set(out["median_s"]) == set(methods)
    benchmark.extra_info.update(bench="lm_step_paired", size=size, device=device, dtype="bf16", paired=out)
