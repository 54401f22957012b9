"""The compiled backend (fastmask._ext: csrc/) against the reference backend.

Optimizer state (exp_avg, exp_avg_sq, max_exp_avg_sq) and scores must match the reference bit for
bit: the kernels compute the same fp32 operations in the same order (explicit fmas where torch's
CPU kernels use them). Parameters are compared with ``STEP_TOL``: torch's own CPU ``sqrt`` (used by
the reference) is not correctly rounded on every build (torch 2.13 AVX-512: ~19% of fp32 results
are 1 ulp off IEEE), while the kernels use IEEE sqrt, so a parameter can differ by an ulp.
Unselected entries must be bit-exact (never written).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastmask
from fastmask import _ext, backends, ops
from tests.utils import (
    BAD_INDEX_VALUES, DTYPES, STEP_TOL, assert_close, assert_steps_never_sync_the_host, make_problem, poisoned_problem,
    random_indices, tol,
)

REASON = _ext.why_not("cpu")
needs_ext = pytest.mark.skipif(REASON is not None, reason=f"compiled extension unavailable: {REASON}")
needs_cuda_ext = pytest.mark.skipif(
    not torch.cuda.is_available() or _ext.why_not("cuda") is not None,
    reason="needs a GPU and the CUDA part of the extension",
)
MODES = ops.SCORE_MODES


def _run(backend, pr, *, amsgrad=False, maximize=False, grad_scale=None, found_inf=None, scores=None,
         mode="grad", lr=1e-2, wd=0.1, betas=(0.9, 0.999)):
    q = copy.deepcopy(pr)
    sc = [s.clone() for s in scores] if scores is not None else None
    with backends.use(backend):
        ops.masked_adamw_step_(
            q.params, q.grads, q.idx, q.exp_avg, q.exp_avg_sq, q.offsets, q.steps, lr, betas[0], betas[1], 1e-8,
            wd, maximize, max_exp_avg_sq=q.max_exp_avg_sq if amsgrad else None, grad_scale=grad_scale,
            found_inf=found_inf, scores=sc, score_mode=mode)
    return q, sc


def _assert_rounding_close(a, b, p0, what):
    """One step differs from the reference by rounding only: the update term may be off by an
    fp32 ulp (torch's sqrt, see the module docstring) and the result by one rounding to its dtype.
    (A bound in ulps of the parameter would be wrong where p * decay and the update cancel.)"""
    eps_dtype = torch.finfo(a.dtype).eps
    a, b, p0 = a.float(), b.float(), p0.float()
    bound = eps_dtype * b.abs() + 2 * torch.finfo(torch.float32).eps * (p0.abs() + (b - p0).abs())
    bad = (a - b).abs() > bound
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} entries beyond rounding of the reference"


def _compare(pr, got, want, dtype, amsgrad, sc_got=None, sc_want=None):
    """State and scores bit for bit, params within rounding of the reference's step, unselected
    entries never written. Tensors on any device (compared on the CPU)."""
    pr, got, want = (_to_cpu(x) for x in (pr, got, want))
    sc_got, sc_want = [x.cpu() for x in sc_got or []], [x.cpu() for x in sc_want or []]
    for t, (a, b, p0) in enumerate(zip(got.params, want.params, pr.params)):
        assert_close(a, b, **tol(dtype), what=f"params[{t}]")
        _assert_rounding_close(a.view(-1), b.view(-1), p0.view(-1).to(a.dtype), f"params[{t}]")
        # unselected entries: bit-exact, never written
        sel = torch.zeros(p0.numel(), dtype=torch.bool)
        sel[pr.idx[pr.offsets[t]:pr.offsets[t + 1]].long()] = True
        assert torch.equal(a.view(-1)[~sel], p0.view(-1)[~sel]), f"params[{t}]: unselected entries changed"
    assert torch.equal(got.exp_avg, want.exp_avg), "exp_avg differs from the reference"
    assert torch.equal(got.exp_avg_sq, want.exp_avg_sq), "exp_avg_sq differs from the reference"
    if amsgrad:
        assert torch.equal(got.max_exp_avg_sq, want.max_exp_avg_sq), "max_exp_avg_sq differs"
    for t, (a, b) in enumerate(zip(sc_got or [], sc_want or [])):
        assert torch.equal(a, b), f"scores[{t}] differ from the reference"


def _to_cpu(pr):
    q = copy.deepcopy(pr)
    for name in ("params", "grads"):
        setattr(q, name, [t.cpu() for t in getattr(q, name)])
    for name in ("idx", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "steps"):
        setattr(q, name, getattr(q, name).cpu())
    return q


SHAPES = {
    "mixed": [(7,), (100, 33), (0,), (1000,), (1,)],
    "one": [(1,)],
    "seven": [(7,)],
    "big_odd": [(1000003,)],
}


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("shapes", list(SHAPES), ids=str)
def test_step_matches_reference(shapes, density, dtype):
    pr = make_problem(SHAPES[shapes], dtype=dtype, density=density, seed=1)
    got, _ = _run("ext", pr)
    want, _ = _run("reference", pr)
    _compare(pr, got, want, dtype, False)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("scaled", [False, True], ids=["noscale", "gradscale"])
def test_step_options(dtype, amsgrad, maximize, scaled):
    pr = make_problem(SHAPES["mixed"] + [(3072, 77)], dtype=dtype, density=0.3, seed=2)
    gs = torch.tensor(1024.0) if scaled else None
    kw = dict(amsgrad=amsgrad, maximize=maximize, grad_scale=gs, wd=0.05, lr=3e-3)
    got, _ = _run("ext", pr, **kw)
    want, _ = _run("reference", pr, **kw)
    _compare(pr, got, want, dtype, amsgrad)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
def test_fused_scores(dtype, mode, density):
    pr = make_problem(SHAPES["mixed"] + [(70000,)], dtype=dtype, density=density, seed=3)
    scores = [torch.randn(p.shape) for p in pr.params]  # poisoned: random start, must accumulate
    kw = dict(scores=scores, mode=mode, grad_scale=torch.tensor(4.0), maximize=True, amsgrad=True)
    got, sg = _run("ext", pr, **kw)
    want, sw = _run("reference", pr, **kw)
    _compare(pr, got, want, dtype, True, sg, sw)


@needs_ext
@pytest.mark.parametrize("with_scores", [False, True], ids=["step", "step+scores"])
def test_found_inf_skips_everything(with_scores):
    pr = make_problem(SHAPES["mixed"], density=0.5, seed=4)
    pr.grads[1].view(-1)[3] = float("inf")
    scores = [torch.randn(p.shape) for p in pr.params] if with_scores else None
    got, sg = _run("ext", pr, found_inf=torch.tensor(1.0), grad_scale=torch.tensor(8.0), scores=scores, amsgrad=True)
    for a, b in zip(got.params, pr.params):
        assert torch.equal(a, b)
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert torch.equal(getattr(got, name), getattr(pr, name)), name
    for a, b in zip(sg or [], scores or []):
        assert torch.equal(a, b)
    # found_inf == 0: a normal step
    got, _ = _run("ext", pr, found_inf=torch.tensor(0.0), amsgrad=True)
    want, _ = _run("reference", pr, found_inf=torch.tensor(0.0), amsgrad=True)
    assert torch.equal(got.exp_avg, want.exp_avg)


@needs_ext
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_score_accumulate(gdtype, mode):
    g = torch.Generator().manual_seed(5)
    shapes = [(7,), (0,), (1,), (300, 301), (1000003,)]
    grads = [torch.randn(s, generator=g).to(gdtype) for s in shapes]
    start = [torch.randn(s, generator=g) for s in shapes]
    outs = []
    for backend in ("ext", "reference"):
        sc = [s.clone() for s in start]
        with backends.use(backend):
            ops.score_accumulate_(sc, grads, mode)
            ops.score_accumulate_(sc, grads, mode)
        outs.append(sc)
    for t, (a, b) in enumerate(zip(*outs)):
        assert torch.equal(a, b), f"scores[{t}]"


@needs_ext
def test_threads_give_identical_results():
    pr = make_problem([(3072, 768), (513,), (2048, 100)], density=0.1, seed=6)
    scores = [torch.randn(p.shape) for p in pr.params]
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_run("ext", pr, scores=scores, mode="abs", amsgrad=True))
            results.append(_run("ext", pr, amsgrad=True))
    finally:
        torch.set_num_threads(before)
    (a1, s1), (b1, _), (a2, s2), (b2, _) = results
    for x, y in ((a1, a2), (b1, b2)):
        for p, q in zip(x.params, y.params):
            assert torch.equal(p, q)
        assert torch.equal(x.exp_avg, y.exp_avg) and torch.equal(x.exp_avg_sq, y.exp_avg_sq)
        assert torch.equal(x.max_exp_avg_sq, y.max_exp_avg_sq)
    for p, q in zip(s1, s2):
        assert torch.equal(p, q)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("track", [None, "fisher"])
def test_masked_adamw_200_steps(dtype, track):
    torch.manual_seed(7)
    shapes = [(64, 48), (33,), (128, 7)]
    init = [torch.randn(s).to(dtype) for s in shapes]
    masks_idx = [random_indices(x.numel(), max(1, x.numel() // 10)) for x in init]
    grads = [[torch.randn(s).to(dtype) for s in shapes] for _ in range(200)]
    runs = {}
    for backend in ("ext", "reference"):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        # the last param stays dense (ordinary AdamW maths)
        masks = {p: i for p, i in zip(params[:2], masks_idx[:2])}
        opt = fastmask.MaskedAdamW(params, lr=1e-2, weight_decay=0.1, masks=masks, track_scores=track)
        with backends.use(backend):
            for step in range(200):
                for p, g in zip(params, grads[step]):
                    p.grad = g.clone()
                opt.step()
        runs[backend] = (params, opt)
    (pe, oe), (pr_, or_) = runs["ext"], runs["reference"]
    for t, (a, b) in enumerate(zip(pe[:2], pr_[:2])):
        assert_close(a.detach(), b.detach(), **tol(dtype), what=f"param {t} after 200 steps")
        sel = torch.zeros(a.numel(), dtype=torch.bool)
        sel[masks_idx[t].long()] = True
        assert torch.equal(a.detach().view(-1)[~sel], init[t].view(-1)[~sel]), "unselected entries changed"
    if dtype == torch.float32:
        # moments only depend on the gradients here, so they agree exactly
        for a, b in zip(pe[:2], pr_[:2]):
            assert torch.equal(oe.state[a]["exp_avg"], or_.state[b]["exp_avg"])
            assert torch.equal(oe.state[a]["exp_avg_sq"], or_.state[b]["exp_avg_sq"])
    if track:
        for a, b in zip(pe[:2], pr_[:2]):
            assert torch.equal(oe.state[a]["scores"], or_.state[b]["scores"])


@needs_ext
def test_version_counters_bumped():
    """Like the reference's in-place ops, the kernels' writes bump the version counters."""
    pr = make_problem([(10,), (20,)], density=0.5)
    scores = [torch.zeros(p.shape) for p in pr.params]
    before = [t._version for t in [*pr.params, pr.exp_avg, pr.exp_avg_sq, pr.max_exp_avg_sq, *scores]]
    with backends.use("ext"):
        ops.masked_adamw_step_(pr.params, pr.grads, pr.idx, pr.exp_avg, pr.exp_avg_sq, pr.offsets, pr.steps, 1e-3,
                               max_exp_avg_sq=pr.max_exp_avg_sq, scores=scores)
    after = [t._version for t in [*pr.params, pr.exp_avg, pr.exp_avg_sq, pr.max_exp_avg_sq, *scores]]
    assert all(a > b for a, b in zip(after, before)), (before, after)
    v = scores[0]._version
    with backends.use("ext"):
        ops.score_accumulate_(scores, pr.grads, "abs")
    assert scores[0]._version > v


def _schema_args(op):
    s = op.default._schema
    alias = lambda ai: None if ai is None else (ai.is_write, sorted(ai.before_set))
    args = [(a.name, str(a.type), alias(a.alias_info), a.kwarg_only) for a in s.arguments]
    return args, [str(r.type) for r in s.returns], str(s).split("::", 1)[1]


@needs_ext
@pytest.mark.parametrize("name", ["masked_adamw_step_", "score_accumulate_", "sampled_weight_grad"])
def test_schema_matches_public_op(name):
    assert _schema_args(getattr(torch.ops.fastmask_ext, name)) == _schema_args(getattr(torch.ops.fastmask, name))


def test_why_not_cuda_gives_reason():
    if not torch.cuda.is_available() or _ext.why_not("cpu") is not None:
        assert _ext.why_not("cuda") is not None
    assert _ext.why_not("mps") is not None


@needs_ext
def test_why_not_cuda_asks_torch_for_a_gpu(monkeypatch):
    """Even a build with CUDA kernels cannot serve CUDA tensors without a GPU: torch decides."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = _ext.why_not("cuda")
    assert reason is not None and "is_available" in reason
    assert _ext.why_not("cpu") is None


def _setup_helpers():
    """setup.py's functions, without running setup()."""
    root = Path(__file__).resolve().parent.parent
    src = (root / "setup.py").read_text()
    ns = {"__file__": str(root / "setup.py"), "__name__": "fastmask_setup_helpers"}
    exec(compile(src[:src.index("ext_modules, cmdclass = _extensions()")], str(root / "setup.py"), "exec"), ns)
    return ns


def test_setup_finds_the_toolkit_behind_an_nvcc_wrapper(tmp_path, monkeypatch):
    """A /usr/local/bin/nvcc-style wrapper script: torch would take its parent directory as
    CUDA_HOME (no cuda_runtime.h there); setup.py asks nvcc where it runs from. An explicit
    CUDA_HOME is taken as given; the default archs are reduced to what that nvcc supports."""
    kit = tmp_path / "cuda-13.0"
    (kit / "include").mkdir(parents=True)
    (kit / "include" / "cuda_runtime.h").write_text("")
    (kit / "bin").mkdir()
    real = kit / "bin" / "nvcc"
    real.write_text("#!/bin/sh\n"
                    'if [ "$1" = "--list-gpu-arch" ]; then printf "compute_75\\ncompute_80\\ncompute_90\\n"; exit 0; fi\n'
                    f"echo '#$ TOP={kit}/bin/..'\n")
    wrappers = tmp_path / "wrapbin"
    wrappers.mkdir()
    (wrappers / "nvcc").write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    for f in (real, wrappers / "nvcc"):
        f.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("FASTMASK_CUDA_ARCHS", raising=False)
    monkeypatch.setenv("PATH", str(wrappers) + os.pathsep + os.environ.get("PATH", ""))
    ns = _setup_helpers()
    home, rejected = ns["find_cuda_home"]("13.0")
    assert home is not None and Path(home).resolve() == kit.resolve(), (home, rejected)
    assert "has no include/cuda_runtime.h" in rejected[0]
    assert ns["_cuda_archs"](str(real)) == ["80", "90+PTX"]  # 100 and 120 unknown to this nvcc
    monkeypatch.setenv("FASTMASK_CUDA_ARCHS", "86;89")
    assert ns["_cuda_archs"](str(real)) == ["86", "89"]
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    home, rejected = ns["find_cuda_home"]("13.0")
    assert home is None and "CUDA_HOME" in rejected[0] and "cuda_runtime.h" in rejected[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: scripts/gpu_check.sh would run")
@pytest.mark.parametrize("python", ["this", "auto"])
def test_gpu_check_fails_fast_without_gpu(tmp_path, python):
    """scripts/gpu_check.sh on a machine without a GPU stops before building or running anything:
    exit 2, one line on stderr saying why, no output folder."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "OUT")}
    env["OUT"] = str(tmp_path / "out")
    if python == "this":
        env["PYTHON"] = sys.executable
    run = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: FAILED before running anything: "), run.stderr
    assert "GPU" in lines[0] or "CUDA" in lines[0] or "torch" in lines[0], lines[0]
    assert run.stdout == "" and not (tmp_path / "out").exists()


@needs_ext
def test_version_mismatch_falls_back_with_warning(tmp_path):
    pkg = Path(fastmask.__file__).resolve().parent
    dst = tmp_path / "fastmask"
    shutil.copytree(pkg, dst, ignore=shutil.ignore_patterns("__pycache__"))
    record = dst / "_C_build.json"
    info = json.loads(record.read_text())
    info["torch"] = "1.0.0+elsewhere"
    record.write_text(json.dumps(info))
    code = textwrap.dedent("""
        import warnings, torch
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import fastmask
            from fastmask import backends
            chosen = backends.pick("cpu")
        assert chosen == "reference", chosen
        assert any("built for torch 1.0.0+elsewhere" in str(x.message) for x in w), [str(x.message) for x in w]
        assert "1.0.0+elsewhere" in backends.why_not("ext", "cpu")
        p = [torch.randn(10)]; g = [torch.randn(10)]
        idx = torch.tensor([1, 4], dtype=torch.int32)
        fastmask.ops.masked_adamw_step_(p, g, idx, torch.zeros(2), torch.zeros(2), [0, 2], torch.ones(1), 1e-3)
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FASTMASK_EXT_JIT": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_reference(dtype, mode):
    """On the GPU the reference runs torch's CUDA kernels, which round addcmul differently from
    its CPU kernels: the CUDA kernels follow them (csrc/adamw_math.h addcmul_torch), so the state
    still equals the reference's bit for bit."""
    pr = make_problem(SHAPES["mixed"] + [(3072, 77)], dtype=dtype, density=0.1, device="cuda", seed=8)
    scores = [torch.randn(p.shape, device="cuda") for p in pr.params]
    kw = dict(scores=scores, mode=mode, grad_scale=torch.tensor(2.0, device="cuda"), amsgrad=True, maximize=True)
    got, sg = _run("ext", pr, **kw)
    want, sw = _run("reference", pr, **kw)
    _compare(pr, got, want, dtype, True, sg, sw)


def _new_grads(pr, gen):
    for g in pr.grads:  # of varying scale: some steps tiny, some large
        scale = 10.0 ** float(torch.randint(-4, 3, (), generator=gen))
        g.copy_((torch.randn(g.shape, generator=gen) * scale).to(device=g.device, dtype=g.dtype))


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.95, 0.9999), (0.0, 0.5), (0.999, 0.99999)], ids=str)
def test_cuda_trajectory_bit_identical_state(betas, dtype):
    """Betas close to 1, 30 steps, amsgrad and fused scores: at every step the CUDA kernels' state
    and scores equal the reference's (torch's CUDA ops) bit for bit and the params are within one
    rounding of it; where the Triton backend runs too, its params equal these bit for bit."""
    gen = torch.Generator().manual_seed(41)
    pr = make_problem([(37, 129), (7,), (5000,), (3072, 77)], dtype=dtype, density=0.3, device="cuda", seed=43,
                      step=0)
    scores = [torch.randn(p.shape, generator=gen).cuda() for p in pr.params]
    twin = backends.why_not("triton", "cuda") is None
    for step in range(30):
        pr.steps += 1
        _new_grads(pr, gen)
        kw = dict(scores=scores, mode="fisher", amsgrad=True, lr=1e-3, wd=0.1, betas=betas)
        got, sg = _run("ext", pr, **kw)
        want, sw = _run("reference", pr, **kw)
        try:
            _compare(pr, got, want, dtype, True, sg, sw)
            if twin:
                tri, st = _run("triton", pr, **kw)
                for t, (a, b) in enumerate(zip(tri.params, got.params)):
                    assert torch.equal(a, b), f"params[{t}]: the Triton and CUDA kernels differ"
                assert torch.equal(tri.exp_avg_sq, got.exp_avg_sq) and all(torch.equal(a, b) for a, b in zip(st, sg))
        except AssertionError as exc:
            raise AssertionError(f"step {step + 1}: {exc}") from None
        pr, scores = got, sg


@needs_cuda_ext
def test_cuda_graph_capture_and_replay():
    """The CUDA kernels take their per-tensor table by value (kernel arguments): a step captured in
    a CUDA graph and replayed with new gradients equals eager reference steps."""
    gen = torch.Generator().manual_seed(45)
    start = make_problem([(37, 129), (7,), (5000,)], density=0.3, device="cuda", seed=47, step=0)
    grads_seq = [[torch.randn(g.shape, generator=gen).cuda() for g in start.grads] for _ in range(5)]
    lr = torch.tensor(1e-3, device="cuda")

    def step(q, scores):
        q.steps.add_(1)
        ops.masked_adamw_step_(q.params, q.grads, q.idx, q.exp_avg, q.exp_avg_sq, q.offsets, q.steps, lr, 0.95,
                               0.9999, 1e-8, 0.1, False, max_exp_avg_sq=q.max_exp_avg_sq, scores=scores,
                               score_mode="abs")

    results = {}
    for backend in ("reference", "ext"):
        q = copy.deepcopy(start)
        scores = [torch.zeros(g.shape, device="cuda") for g in q.grads]
        with backends.use(backend):
            if backend == "reference":
                for gs in grads_seq:
                    for g, x in zip(q.grads, gs):
                        g.copy_(x)
                    step(q, scores)
            else:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for gs in grads_seq[:2]:
                        for g, x in zip(q.grads, gs):
                            g.copy_(x)
                        step(q, scores)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step(q, scores)
                for gs in grads_seq[2:]:
                    for g, x in zip(q.grads, gs):
                        g.copy_(x)
                    graph.replay()
        torch.cuda.synchronize()
        results[backend] = (q, scores)
    (want, sw), (got, sg) = results["reference"], results["ext"]
    for t, (a, b) in enumerate(zip(got.params, want.params)):
        assert_close(a, b, **tol(torch.float32), what=f"params[{t}]")
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "steps"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert all(torch.equal(a, b) for a, b in zip(sg, sw)), "scores"


@needs_cuda_ext
@pytest.mark.parametrize("variant", ["plain", "scores-tensor-lr", "grad-scaler"])
def test_cuda_masked_adamw_steps_never_sync_the_host(variant):
    """``torch.cuda.set_sync_debug_mode("error")`` around ``MaskedAdamW`` steps through the CUDA
    kernels: no step after the first (which checks the masks' index buffers) waits for the GPU."""
    assert_steps_never_sync_the_host("ext", variant, seed=49)


@needs_cuda_ext
@pytest.mark.skipif(os.environ.get("FASTMASK_TEST_BIG", "0") in ("", "0"),
                    reason="allocates ~17 GB on the GPU; set FASTMASK_TEST_BIG=1 (scripts/gpu_check.sh does)")
@pytest.mark.parametrize("fused", [False, True], ids=["step", "step+scores"])
def test_cuda_indices_near_the_int32_limit(fused):
    """A bf16 tensor of 2^31 - 1 entries (the most int32 flat indices address) beside a small one:
    selected entries at both ends step as the reference steps compact copies of them; the entries
    around them are not touched; fused scores reach the very last entry."""
    n = 2**31 - 1
    free, _ = torch.cuda.mem_get_info()
    if free < n * (8 if fused else 4) + 2**31:
        pytest.skip(f"needs ~{n * (8 if fused else 4) / 2**30:.0f} GiB free on the GPU, {free / 2**30:.0f} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(51)
    big = torch.randn(n, generator=gen, device="cuda", dtype=torch.bfloat16)
    big_grad = torch.randn(n, generator=gen, device="cuda", dtype=torch.bfloat16)
    small = torch.randn(7, generator=gen, device="cuda", dtype=torch.bfloat16)
    small_grad = torch.randn(7, generator=gen, device="cuda", dtype=torch.bfloat16)
    sel_big = torch.cat([torch.tensor([0, 1, 2, 1000, 2**30]), torch.arange(n - 5000, n)]).to(torch.int32).cuda()
    sel_small = torch.tensor([1, 5], dtype=torch.int32, device="cuda")
    k = sel_big.numel() + 2
    offsets = [0, sel_big.numel(), k]
    state = [torch.rand(k, generator=gen, device="cuda") * s for s in (0.1, 0.01, 0.02)]
    steps = torch.tensor([3.0, 4.0], device="cuda")
    scores = [torch.zeros(n, device="cuda"), torch.zeros(7, device="cuda")] if fused else []
    tail, near = slice(n - 20000, n), slice(3, 1000)
    tail_before, near_before = big[tail].clone(), big[near].clone()
    compact = [big[sel_big.long()].clone(), small.clone()]
    compact_grads = [big_grad[sel_big.long()].clone(), small_grad.clone()]
    ref_state = [x.clone() for x in state]
    compact_idx = torch.cat([torch.arange(sel_big.numel(), dtype=torch.int32, device="cuda"), sel_small])
    with backends.use("reference"):
        ops.masked_adamw_step_(compact, compact_grads, compact_idx, ref_state[0], ref_state[1], offsets, steps, 1e-2,
                               0.9, 0.999, 1e-8, 0.1, False, max_exp_avg_sq=ref_state[2])
    with backends.use("ext"):
        ops.masked_adamw_step_([big, small], [big_grad, small_grad], torch.cat([sel_big, sel_small]), state[0],
                               state[1], offsets, steps, 1e-2, 0.9, 0.999, 1e-8, 0.1, False,
                               max_exp_avg_sq=state[2], scores=scores, score_mode="fisher")
    torch.cuda.synchronize()
    for name, a, b in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), state, ref_state):
        assert torch.equal(a, b), name
    assert_close(big[sel_big.long()], compact[0], **tol(torch.bfloat16), what="selected entries of the big tensor")
    assert_close(small, compact[1], **tol(torch.bfloat16), what="the small tensor")
    unselected = torch.ones(20000, dtype=torch.bool, device="cuda")
    unselected[-5000:] = False
    assert torch.equal(big[tail][unselected], tail_before[unselected]), "unselected tail entries changed"
    assert torch.equal(big[near], near_before), "unselected entries near the start changed"
    if fused:
        g = big_grad[tail].float()
        assert torch.equal(scores[0][tail], g * g), "scores of the last entries"
        g0 = big_grad[:1000].float()
        assert torch.equal(scores[0][:1000], g0 * g0), "scores of the first entries"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@needs_cuda_ext
def test_cuda_tensors_on_another_gpu_are_refused():
    """The C++ layer checks every tensor's exact device, not only its type: a kernel launched on
    the params' GPU must never be handed another GPU's pointers."""
    pr = make_problem([(100,), (7,)], density=0.5, device="cuda:0", seed=53)
    for name in ("idx", "exp_avg", "steps"):
        q = copy.deepcopy(pr)
        setattr(q, name, getattr(q, name).to("cuda:1"))
        with pytest.raises(RuntimeError, match=name):
            torch.ops.fastmask_ext.masked_adamw_step_(
                q.params, q.grads, q.idx, q.exp_avg, q.exp_avg_sq, q.offsets, q.steps, torch.tensor(1e-3), 0.9, 0.999,
                1e-8, 0.0, False, None, None, None, [], "grad")


@pytest.mark.skipif(os.environ.get("FASTMASK_TEST_JIT", "0") in ("", "0"),
                    reason="JIT build takes a minute or more; set FASTMASK_TEST_JIT=1")
def test_jit_build(tmp_path):
    """FASTMASK_EXT_JIT=1 builds the sources with ninja into FASTMASK_CACHE_DIR and loads them."""
    code = textwrap.dedent("""
        import fastmask._ext as ext
        assert ext.why_not("cpu") is None, ext.why_not("cpu")
        info = ext.info()
        assert info["source"] == "jit", info
        print("ok", info["path"])
    """)
    env = {**os.environ, "FASTMASK_EXT_JIT": "1", "FASTMASK_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": str(Path(fastmask.__file__).resolve().parent.parent)}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # ninja from the venv
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-4000:]
    assert str(tmp_path) in out.stdout


@needs_ext
@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_other_cpu_isa_variants(isa):
    """The kernels exist in several instruction-set variants; the ones this CPU does not pick by
    default must give the same results too (run in a subprocess: the choice is made once)."""
    code = textwrap.dedent("""
        import copy, torch
        from fastmask import backends, ops
        from tests.utils import make_problem
        print("isa", torch.ops.fastmask_ext.cpu_isa() if hasattr(torch.ops, "fastmask_ext") else None)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            pr = make_problem([(7,), (300, 33), (5000,)], dtype=dtype, density=0.3, seed=9)
            start = [torch.randn(p.shape) for p in pr.params]
            out = []
            for backend in ("ext", "reference"):
                q = copy.deepcopy(pr); sc = [s.clone() for s in start]
                with backends.use(backend):
                    ops.masked_adamw_step_(q.params, q.grads, q.idx, q.exp_avg, q.exp_avg_sq, q.offsets, q.steps,
                                           1e-2, 0.9, 0.999, 1e-8, 0.1, True, max_exp_avg_sq=q.max_exp_avg_sq,
                                           grad_scale=torch.tensor(2.0), scores=sc, score_mode="fisher")
                out.append((q, sc))
            (a, sa), (b, sb) = out
            assert torch.equal(a.exp_avg, b.exp_avg) and torch.equal(a.exp_avg_sq, b.exp_avg_sq)
            assert torch.equal(a.max_exp_avg_sq, b.max_exp_avg_sq)
            assert all(torch.equal(x, y) for x, y in zip(sa, sb))
            from tests.utils import tol
            for x, y in zip(a.params, b.params):
                torch.testing.assert_close(x, y, **tol(dtype))
        print("ok")
    """)
    env = {**os.environ, "FASTMASK_CPU_ISA": isa,
           "PYTHONPATH": str(Path(fastmask.__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", "import fastmask._ext\n" + code], capture_output=True, text=True,
                         env=env, cwd=Path(fastmask.__file__).resolve().parent.parent)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-4000:]
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        assert f"isa {isa}" in out.stdout, out.stdout


_ISA_CASE = textwrap.dedent("""
    import copy, sys, torch
    from fastmask import backends, ops
    from tests.utils import make_problem
    out = {"isa": torch.ops.fastmask_ext.cpu_isa()}
    # tails of every length, empty tensors, tensor boundaries inside a thread's range and inside a
    # 16-entry block, a range split into sub-ranges shorter than a block
    shapes = [(7,), (0,), (300, 33), (1,), (16,), (17,), (5000,), (31,), (70001,)]
    for dtype in (torch.float32, torch.bfloat16):
        for density in (0.01, 0.1, 0.5, 1.0):
            for opts in ({}, {"amsgrad": True, "maximize": True, "scale": 4.0}, {"scores": "fisher"}):
                pr = make_problem(shapes, dtype=dtype, density=density, seed=11)
                gen = torch.Generator().manual_seed(12)
                sc = [torch.randn(p.shape, generator=gen) for p in pr.params] if "scores" in opts else None
                with backends.use("ext"):
                    ops.masked_adamw_step_(
                        pr.params, pr.grads, pr.idx, pr.exp_avg, pr.exp_avg_sq, pr.offsets, pr.steps, 3e-3, 0.9,
                        0.999, 1e-8, 0.05, opts.get("maximize", False),
                        max_exp_avg_sq=pr.max_exp_avg_sq if opts.get("amsgrad") else None,
                        grad_scale=torch.tensor(opts["scale"]) if "scale" in opts else None,
                        scores=sc, score_mode=opts.get("scores", "grad"))
                out[(str(dtype), density, str(sorted(opts)))] = (pr.params, pr.exp_avg, pr.exp_avg_sq,
                                                                 pr.max_exp_avg_sq, sc)
    torch.save(out, sys.argv[1])
""")


@needs_ext
def test_cpu_isa_variants_bit_identical(tmp_path):
    """Every instruction-set variant (the AVX-512 one has its own gather/scatter step for fp32)
    gives bit-identical parameters, state and scores: same IEEE operations in the same order."""
    root = Path(fastmask.__file__).resolve().parent.parent
    script = tmp_path / "case.py"
    script.write_text("import fastmask._ext\nfastmask._ext.why_not('cpu')\n" + _ISA_CASE)
    results = {}
    for isa in ("native", "avx2", "default"):
        env = {**os.environ, "PYTHONPATH": str(root)}
        env.pop("FASTMASK_CPU_ISA", None)
        if isa != "native":
            env["FASTMASK_CPU_ISA"] = isa
        path = tmp_path / f"{isa}.pt"
        out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, env=env,
                             cwd=root)
        assert out.returncode == 0, out.stderr[-4000:]
        results[isa] = torch.load(path, weights_only=False)
    native = results.pop("native")
    assert len(native) > 1
    for isa, res in results.items():
        for key, want in native.items():
            if key == "isa":
                continue
            got = res[key]
            for name, a, b in zip(("params", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "scores"), got, want):
                if isinstance(a, list):
                    assert all(torch.equal(x, y) for x, y in zip(a, b)), f"{isa} vs {native['isa']}: {name} {key}"
                elif a is not None:
                    assert torch.equal(a, b), f"{isa} vs {native['isa']}: {name} {key}"


# ---------------------------------------------------------------------------------------------
# index safety: the kernels check every index they use (fastmask.ops' check is cached per version
# of the index buffer, and the backend op can be called directly)
# ---------------------------------------------------------------------------------------------
GUARD = 1031  # entries of poisoned memory before, between and after the params
# shapes: several threads, AVX-512 blocks and tails, and (70001) more than one fused-score chunk
BAD_SHAPES = [(300, 33), (7,), (70001,)]
BAD_VALUES = BAD_INDEX_VALUES


def _poisoned_problem(dtype, seed=21):
    return poisoned_problem(BAD_SHAPES, dtype, density=0.2, seed=seed, guard=GUARD)


def _ext_step(params, grads, idx, m, v, offsets, steps, vm, scores, mode):
    torch.ops.fastmask_ext.masked_adamw_step_(
        params, grads, idx, m, v, offsets, steps, torch.tensor(1e-2, dtype=torch.float64), 0.9, 0.999, 1e-8, 0.1,
        False, vm, None, None, scores, mode)


def _check_bad_indices(dtype, kind, placement, where, fused, amsgrad):
    """Put three out-of-range indices in tensor `where` (sorted: at the front for negative ones, at
    the end for the others; middle: unsorted, in the middle) and call the backend op directly:
    IndexError naming idx, nothing outside the params written, nothing read or written at the bad
    entries, every other entry stepped exactly as without them."""
    pr, pbuf, gbuf, inside = _poisoned_problem(dtype)
    t = where
    lo, hi = pr.offsets[t], pr.offsets[t + 1]
    numel = pr.params[t].numel()
    values = BAD_VALUES[kind](numel)
    if placement == "middle":
        at = (lo + hi) // 2 + torch.arange(3)
    elif values[0] < 0:
        at = lo + torch.arange(3)
    else:
        at = hi - 3 + torch.arange(3)
    idx = pr.idx.clone()
    idx[at] = torch.tensor(values, dtype=torch.int32)
    keep = torch.ones(idx.numel(), dtype=torch.bool)
    keep[at] = False

    gen = torch.Generator().manual_seed(5)
    scores0 = [torch.randn(p.shape, generator=gen) for p in pr.params] if fused else []
    mode = "fisher" if fused else "grad"
    pbuf0, gbuf0 = pbuf.clone(), gbuf.clone()
    m, v, vm = pr.exp_avg.clone(), pr.exp_avg_sq.clone(), pr.max_exp_avg_sq.clone() if amsgrad else None
    scores = [s.clone() for s in scores0]
    with pytest.raises(IndexError, match=rf"^idx: 3 indices of tensor {t} are outside \[0, {numel}\) "
                                         rf"\(first: {values[0]}\);"):
        _ext_step(pr.params, pr.grads, idx, m, v, pr.offsets, pr.steps, vm, scores, mode)
    # memory outside the params: bit-identical; grads never written
    assert torch.equal(pbuf[~inside].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       pbuf0[~inside].view(torch.int16 if dtype != torch.float32 else torch.int32)), \
        "memory outside the params was written"
    assert torch.equal(gbuf, gbuf0), "grads were written"
    # the bad entries' state: unchanged
    assert torch.equal(m[~keep], pr.exp_avg[~keep]) and torch.equal(v[~keep], pr.exp_avg_sq[~keep])
    if amsgrad:
        assert torch.equal(vm[~keep], pr.max_exp_avg_sq[~keep])

    # every other entry: exactly as a step over the valid entries alone
    offsets = [int(keep[:o].sum()) for o in pr.offsets]
    params = [p.clone() for p in _poisoned_problem(dtype)[0].params]
    mc, vc = pr.exp_avg[keep].clone(), pr.exp_avg_sq[keep].clone()
    vmc = pr.max_exp_avg_sq[keep].clone() if amsgrad else None
    sc = [s.clone() for s in scores0]
    _ext_step(params, [g.clone() for g in pr.grads], idx[keep].clone(), mc, vc, offsets, pr.steps, vmc, sc, mode)
    for u, (a, b) in enumerate(zip(pr.params, params)):
        assert torch.equal(a, b), f"params[{u}] differ from a step without the bad entries"
    assert torch.equal(m[keep], mc) and torch.equal(v[keep], vc)
    if amsgrad:
        assert torch.equal(vm[keep], vmc)
    for u, (a, b) in enumerate(zip(scores, sc)):
        assert torch.equal(a, b), f"scores[{u}] differ"


@needs_ext
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("fused", [False, True], ids=["step", "step+scores"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where", [0, 2], ids=["first-tensor", "last-tensor"])
@pytest.mark.parametrize("placement", ["sorted", "middle"])
@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_out_of_range_indices_never_touch_memory(kind, placement, where, dtype, fused, amsgrad):
    _check_bad_indices(dtype, kind, placement, where, fused, amsgrad)


@needs_ext
@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_out_of_range_indices_other_cpu_isa_variants(isa):
    """The same checks in the instruction-set variants this CPU does not pick by default."""
    code = textwrap.dedent("""
        import itertools, torch
        from tests.test_ext import _check_bad_indices
        print("isa", torch.ops.fastmask_ext.cpu_isa())
        for dtype, kind, fused in itertools.product((torch.float32, torch.bfloat16), ("far", "int32-min"),
                                                    (False, True)):
            _check_bad_indices(dtype, kind, "sorted", 2, fused, True)
            _check_bad_indices(dtype, kind, "middle", 0, fused, False)
        print("ok")
    """)
    root = Path(fastmask.__file__).resolve().parent.parent
    env = {**os.environ, "FASTMASK_CPU_ISA": isa, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", "import fastmask._ext\n" + code], capture_output=True, text=True,
                         env=env, cwd=root)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-4000:]
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        assert f"isa {isa}" in out.stdout, out.stdout


@needs_ext
@pytest.mark.parametrize("how", ["data", "numpy", "alias"])
@pytest.mark.parametrize("track", [None, "abs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_index_write_without_version_bump_raises(dtype, track, how):
    """A write to a mask that does not bump the index buffer's version (so fastmask.ops' cached
    check does not see it) reaches the kernel, which skips the bad entry and raises: the neighbour
    sharing the storage is not written."""
    gen = torch.Generator().manual_seed(31)
    base = torch.randn(64 + 200, generator=gen).to(dtype)
    a = torch.nn.Parameter(base[:64].view(8, 8))
    b = torch.nn.Parameter(base[64:])
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one storage, b right after a
    a_sel = [1, 5, 9, 30, 60]
    b_sel = torch.cat([torch.arange(0, 3), torch.arange(4, 200, 4)]).to(torch.int32)  # not b's entry 3
    opt = fastmask.MaskedAdamW([a, b], lr=1e-2, weight_decay=0.1, masks={a: torch.tensor(a_sel), b: b_sel},
                               track_scores=track)

    def step():
        a.grad = torch.randn(a.shape, generator=gen).to(dtype)
        b.grad = torch.randn(b.shape, generator=gen).to(dtype)
        opt.step()

    with backends.use("ext"):
        step()  # the index buffer is checked (and the check cached)
        idx = opt.masks[a]
        version = idx._version
        if how == "data":
            idx.data[-1] = 64 + 3  # b's entry 3, which b's mask does not select
        elif how == "numpy":
            idx.numpy()[-1] = 64 + 3
        else:
            alias = torch.empty(0, dtype=torch.int32).set_(idx.untyped_storage(), idx.storage_offset(), idx.shape)
            alias[-1] = 64 + 3
        assert idx._version == version and int(idx[-1]) == 67  # the cached check cannot see it
        a_before, b_before = a.detach().clone(), b.detach().clone()
        with pytest.raises(IndexError, match=r"idx: 1 index of tensor 0 is outside \[0, 64\) \(first: 67\)"):
            step()
    b_unselected = torch.ones(200, dtype=torch.bool)
    b_unselected[b_sel.long()] = False
    assert torch.equal(b.detach()[b_unselected], b_before[b_unselected]), "the neighbouring param was written"
    assert torch.equal(b.detach()[3], b_before[3])
    a_unselected = torch.ones(64, dtype=torch.bool)
    a_unselected[a_sel] = False
    a_unselected[60] = True  # replaced by the bad index: not stepped
    assert torch.equal(a.detach().view(-1)[a_unselected], a_before.view(-1)[a_unselected])


def test_why_not_call():
    assert _ext.why_not_call(torch.float32, True) is None
    assert _ext.why_not_call(torch.bfloat16, True) is None
    assert _ext.why_not_call(torch.float16, True) is None
    assert "torch.float64" in _ext.why_not_call(torch.float64, True)
    reason = _ext.why_not_call(torch.float32, False)
    assert isinstance(reason, str) and "contiguous" in reason
