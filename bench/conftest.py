"""Options, parametrization and shared fixtures of the benchmark suite.

Run from the repository root::

    python -m pytest bench/ --benchmark-only                      # default CPU run (tiny + vitb16)
    python -m pytest bench/ --benchmark-disable --shapes tiny     # CI smoke: every case once

Options (comma-separated lists):

- ``--shapes``: shape sets, from ``tiny`` (the c_fc weights of tests.utils.tiny_open_clip),
  ``vitb16`` (12x[3072,768] + 12x[2048,512]) and ``vitl14`` (24x[4096,1024] + 12x[3072,768],
  opt-in). Default ``tiny,vitb16``.
- ``--densities``: default ``0.01,0.1,0.3``.
- ``--masks``: ``random`` (uniform) and/or ``scored`` (``fastmask.score`` + ``fastmask.select`` on a
  randomly initialised open_clip model with those c_fc shapes, on random images/captions, computed
  once per session). Default both.
- ``--device``: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cpu,cuda``.
- ``--dtypes``: ``fp32``, ``bf16``, ``fp16``; default ``fp32``.
- ``--case-time``: seconds of timed rounds per case (at least 3 rounds); default 0.6.
- ``--paired-rounds``: rounds of ``test_masked_step_paired``, which calls every implementation of
  a case in turn so that their ratios hold on a busy machine; default 5.
- ``--e2e-model``: the end-to-end training-step model: ``small`` (a 4-layer width-256 CLIP at
  64 px, quick on a CPU), ``tiny`` (tests.utils.tiny_open_clip), or an open_clip model name such
  as ``ViT-B-16``. Default ``auto``: ``tiny`` when ``--shapes tiny`` alone (CI), else ``small``.
- ``--e2e-batch``: its batch size (default 8).
- ``--lm-size``: the language-model step's sizes (``bench/lm_step.py``): ``tiny``, ``small``,
  ``400m``. Default ``auto``: ``tiny`` when ``--shapes tiny`` alone (CI), else ``400m``.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: before any triton.jit

import fastmask  # noqa: E402
import fastmask.compat  # noqa: E402

fastmask.compat.patch_torchvision()

from bench import common  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("fastmask-bench")
    g.addoption("--shapes", default="tiny,vitb16", help="shape sets: tiny, vitb16, vitl14 (default tiny,vitb16)")
    g.addoption("--densities", default="0.01,0.1,0.3", help="mask densities (default 0.01,0.1,0.3)")
    g.addoption("--masks", default="random,scored", help="mask kinds: random, scored (default both)")
    g.addoption("--device", default="auto", help="auto, cpu, cuda, or cpu,cuda (default auto)")
    g.addoption("--dtypes", default="fp32", help="param dtypes: fp32, bf16, fp16 (default fp32)")
    g.addoption("--case-time", type=float, default=0.6, help="seconds of timed rounds per case (default 0.6)")
    g.addoption("--paired-rounds", type=int, default=5,
                help="rounds of the interleaved masked-step comparison (default 5)")
    g.addoption("--e2e-model", default="auto",
                help="end-to-end model: auto (tiny for --shapes tiny, else small), small, tiny or an open_clip name")
    g.addoption("--e2e-batch", type=int, default=8, help="end-to-end batch size (default 8)")
    g.addoption("--lm-size", default="auto",
                help="language-model step sizes (test_lm_step.py): auto (tiny for --shapes tiny, else 400m), tiny, small, 400m")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


class Options:
    def __init__(self, config):
        self.shapes = _split(config.getoption("--shapes"))
        for s in self.shapes:
            if s not in common.SHAPE_SETS:
                raise pytest.UsageError(f"--shapes: unknown shape set {s!r}; known: {', '.join(common.SHAPE_SETS)}")
        self.densities = [float(d) for d in _split(config.getoption("--densities"))]
        self.masks = _split(config.getoption("--masks"))
        for m in self.masks:
            if m not in ("random", "scored"):
                raise pytest.UsageError(f"--masks: unknown mask kind {m!r}; known: random, scored")
        dev = _split(config.getoption("--device"))
        if dev == ["auto"]:
            dev = ["cuda" if torch.cuda.is_available() else "cpu"]
        for d in dev:
            if d not in ("cpu", "cuda"):
                raise pytest.UsageError(f"--device: expected auto, cpu or cuda, got {d!r}")
            if d == "cuda" and not torch.cuda.is_available():
                raise pytest.UsageError("--device cuda: no CUDA device is available")
        self.devices = dev
        self.dtypes = _split(config.getoption("--dtypes"))
        for d in self.dtypes:
            if d not in common.DTYPES:
                raise pytest.UsageError(f"--dtypes: unknown dtype {d!r}; known: {', '.join(common.DTYPES)}")
        self.case_time = config.getoption("--case-time")
        self.paired_rounds = config.getoption("--paired-rounds")
        self.e2e_model = config.getoption("--e2e-model")
        if self.e2e_model == "auto":
            self.e2e_model = "tiny" if self.shapes == ["tiny"] else "small"
        self.e2e_batch = config.getoption("--e2e-batch")
        self.lm_sizes = _split(config.getoption("--lm-size"))
        if self.lm_sizes == ["auto"]:
            self.lm_sizes = ["tiny"] if self.shapes == ["tiny"] else ["400m"]

    def backends(self, device: str) -> list[str]:
        """Every fastmask backend the registry reports available for the device type."""
        return fastmask.backends.available(torch.device(device).type)


def pytest_configure(config):
    config._fastmask_bench = Options(config)
    # other processes compete for the cores on a shared machine: record the load at the start
    config._fastmask_load_start = os.getloadavg() if hasattr(os, "getloadavg") else None


def options(config) -> Options:
    return config._fastmask_bench


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """After pytest-benchmark's timing table: the masked step's ratios against the dense baselines
    of the same run (interleaved cases when present) and the speed bars, as `bench.report` writes
    them into RESULTS.md."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or getattr(session, "disabled", False) or not session.benchmarks:
        return
    from bench import report

    dicts = [b.as_dict(include_data=False) for b in session.benchmarks]
    rows = report.masked_step_rows(dicts, paired=True)
    source = "interleaved runs"
    if not rows:
        rows, source = report.masked_step_rows(dicts), "separate cases"
    if not rows:
        return
    tr = terminalreporter
    tr.section(f"fastmask: masked step vs the dense baselines ({source}; time ratios, higher = fastmask faster)")
    tr.write_line(f"{'device':6} {'dtype':5} {'shapes':7} {'mask':7} {'density':>7} {'best':>9} {'ms':>8} "
                  f"{'x fused':>8} {'x foreach':>9} {'x original':>10} {'x reference':>11} {'% fused BW':>10}")
    for r in rows:
        tr.write_line(
            f"{r['device']:6} {r['dtype']:5} {r['shape_set']:7} {r['mask']:7} {r['density']:>7g} {r['best']:>9} "
            f"{1e3 * r['t_best']:8.3f} {report._x(r['t_best'], r['t_fused']):>8} "
            f"{report._x(r['t_best'], r['t_foreach']):>9} {report._x(r['t_best'], r['t_original']):>10} "
            f"{report._x(r['t_best'], r['t_reference']):>11} {report._fmt(r['bw_pct'], 0):>9}%")
    bars = report.bars_section(rows)
    if len(bars) > 2:
        tr.write_line("")
        for line in bars:
            tr.write_line(line)
    tr.write_line("")
    tr.write_line("Report and plot: add --benchmark-json=bench/results-cpu.json, then python -m bench.report "
                  "bench/results-cpu.json")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Machine description stored in the JSON (read by bench.report)."""
    info = common.machine_info()
    info["loadavg_start"] = getattr(config, "_fastmask_load_start", None)
    info["loadavg_end"] = info.pop("loadavg")
    machine_info["fastmask"] = info
    machine_info["fastmask_backends"] = {
        d: fastmask.backends.available(d) for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available()
    }
    machine_info["fastmask_backend_report"] = fastmask.backends.report()
    opts = options(config)
    machine_info["fastmask_command"] = "python -m pytest " + " ".join(config.invocation_params.args)
    machine_info["fastmask_bench_options"] = {
        "shapes": opts.shapes, "densities": opts.densities, "masks": opts.masks, "devices": opts.devices,
        "dtypes": opts.dtypes, "case_time": opts.case_time, "e2e_model": opts.e2e_model,
        "e2e_batch": opts.e2e_batch,
    }


# ------------------------------------------------------------------------------------------------
# shared data, cached per session (one shape set's tensors alive at a time)
# ------------------------------------------------------------------------------------------------
class Problems:
    """Random params and grads (never zero) of one shape set on one device and dtype; kept for
    the most recent key only so that the large sets do not pile up in memory."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, shape_set: str, device: str, dtype: torch.dtype):
        key = (shape_set, device, dtype)
        if key != self._key:
            self._key = self._value = None
            gc.collect()
            g = torch.Generator().manual_seed(0)
            shapes = common.SHAPE_SETS[shape_set]
            params = [(0.02 * torch.randn(s, generator=g)).to(device=device, dtype=dtype) for s in shapes]
            grads = [(1e-3 * torch.randn(s, generator=g)).to(device=device, dtype=dtype) for s in shapes]
            self._key, self._value = key, (params, grads)
        return self._value


class Masks:
    """Index lists (CPU int32, sorted) per (shape set, kind, density); model scores per shape set."""

    def __init__(self):
        self._scores: dict[str, list[torch.Tensor]] = {}
        self._masks: dict[tuple, list[torch.Tensor]] = {}

    def scores(self, shape_set: str) -> list[torch.Tensor]:
        if shape_set not in self._scores:
            self._scores = {}  # one shape set's scores at a time
            gc.collect()
            self._scores[shape_set] = common.model_scores(shape_set)
        return self._scores[shape_set]

    def get(self, shape_set: str, kind: str, density: float) -> list[torch.Tensor]:
        key = (shape_set, kind, density)
        if key not in self._masks:
            if kind == "random":
                m = common.random_masks(common.SHAPE_SETS[shape_set], density)
            else:
                m = common.select_masks(self.scores(shape_set), density)
            self._masks[key] = m
        return self._masks[key]


@pytest.fixture(scope="session")
def problems():
    return Problems()


@pytest.fixture(scope="session")
def masks():
    return Masks()


@pytest.fixture
def opts(request) -> Options:
    return options(request.config)
