"""End-to-end training step (forward, backward, optimizer step) of an open_clip CLIP with the
c_fc targets at 10%: fastmask vs the masked dense baselines vs full fine-tuning.

Time per step: measured in this process by pytest-benchmark. Peak memory: measured in a fresh
subprocess per case (``python -m bench.train_step``; see its docstring for exactly what), since
a process's peak resident set cannot be reset and torch keeps no CPU allocator statistics.
The model is ``--e2e-model`` (default ``small``: a 4-layer width-256 CLIP at 64 px, or ``tiny`` when
only the tiny shape set runs; ``ViT-B-16`` is realistic but slow on a few CPU cores). With
``--benchmark-disable`` (smoke) only the ``fastmask`` case spawns the memory subprocess.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common, train_step
from bench.conftest import options

DENSITY = 0.1
ROOT = Path(__file__).resolve().parent.parent


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    o = options(metafunc.config)
    cases = [pytest.param((dev, m), id=f"{o.e2e_model}-{dev}-{m}") for dev in o.devices for m in train_step.METHODS]
    metafunc.parametrize("case", cases)


def _memory(model: str, method: str, device: str, batch: int, steps: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bench.train_step", "--model", model, "--method", method, "--device", device,
           "--batch", str(batch), "--density", str(DENSITY), "--steps", str(steps)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_train_step(benchmark, case, opts, request):
    device, method = case
    disabled = request.config.getoption("benchmark_disable", False)
    c = train_step.Case(opts.e2e_model, method, device, opts.e2e_batch, DENSITY)
    info = benchmark.extra_info
    info.update(bench="train_step", model=opts.e2e_model, impl=method, device=device, dtype="fp32",
                batch=opts.e2e_batch, density=DENSITY, params=c.n_params, trainable=c.trainable,
                N=c.n_masked, K=c.k)
    common.run_timed(benchmark, c.step, device, opts.case_time * 3, min_rounds=3, max_rounds=20)
    info["opt_state_bytes"] = c.state_bytes()
    t = common.mean_time(benchmark)
    if t:
        info["mean_s"] = t
    del c
    gc.collect()
    if disabled and method != "fastmask":
        return  # smoke run: one memory subprocess is enough to exercise the path
    mem = _memory(opts.e2e_model, method, device, opts.e2e_batch, steps=1 if disabled else 2)
    info["rss_setup_bytes"] = mem["rss_setup_kib"] * 1024
    info["peak_rss_bytes"] = mem["maxrss_kib"] * 1024
    info["train_rss_bytes"] = (mem["maxrss_kib"] - mem["rss_setup_kib"]) * 1024
    if "cuda_max_allocated" in mem:
        info["cuda_max_allocated_bytes"] = mem["cuda_max_allocated"]
