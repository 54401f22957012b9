"""Smoke test of an *installed* fastmask (a prebuilt wheel), run by .ci/run from a temporary
directory outside the source tree, in a fresh environment holding only torch, the wheel and its
dependencies. Self-contained: imports nothing from the checkout (no ``tests.utils``).

Run it by hand the same way::

    cp tests/smoke_installed.py /tmp/x/ && cd /tmp/x && \\
        FASTMASK_CHECKOUT=/path/to/checkout /path/to/venv/bin/python -m pytest -q smoke_installed.py
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

import fastmask
from fastmask import _ext, backends

PKG = Path(fastmask.__file__).resolve().parent
SITE_DIRS = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
CHECKOUT = os.environ.get("FASTMASK_CHECKOUT")
MAJOR, MINOR = (int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())


def test_imported_from_site_packages():
    assert PKG.parent in SITE_DIRS, f"fastmask imported from {PKG}, not from site-packages {SITE_DIRS}"
    if CHECKOUT:
        assert not PKG.is_relative_to(Path(CHECKOUT).resolve()), f"fastmask imported from the checkout: {PKG}"
    # the Triton kernels ship as fastmask.kernels (not imported: triton is not installed here)
    spec = importlib.util.find_spec("fastmask.kernels")
    assert spec is not None and Path(spec.origin).resolve().parent == PKG / "kernels"
    for name in ("__init__.py", "_utils.py", "masked_adamw.py", "score_accumulate.py"):
        assert (PKG / "kernels" / name).is_file(), name
    assert importlib.util.find_spec("kernels") is None, "a top-level 'kernels' module was installed"


def test_wheel_metadata_names_this_torch():
    dist = importlib.metadata.distribution("fastmask")
    assert dist.version.startswith(fastmask.__version__ + "+"), dist.version
    want = f"pt{MAJOR}{MINOR}" + ("cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu")
    assert dist.version.split("+", 1)[1] == want, (dist.version, torch.__version__)
    torch_req = [r for r in dist.requires or [] if re.match(r"torch\b", r)]
    assert len(torch_req) == 1, dist.requires
    spec = sorted(torch_req[0][len("torch"):].replace(" ", "").split(","))
    assert spec == sorted([f">={MAJOR}.{MINOR}", f"<{MAJOR}.{MINOR + 1}"]), torch_req
    files = {str(f) for f in dist.files or []}
    assert {"fastmask/_C.so", "fastmask/_C_build.json", "fastmask/kernels/masked_adamw.py"} <= files, files
    record = json.loads((PKG / "_C_build.json").read_text())
    assert record["torch"] == torch.__version__, record


def test_ext_backend_from_the_wheel():
    assert backends.why_not("ext", "cpu") is None, backends.why_not("ext", "cpu")
    assert backends.pick("cpu") == "ext"
    info = _ext.info()
    assert info["source"] == "prebuilt", info
    lib = Path(info["path"]).resolve()
    assert lib.parent == PKG and lib.name == "_C.so", lib
    if CHECKOUT:
        assert not lib.is_relative_to(Path(CHECKOUT).resolve()), lib


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_adamw_matches_reference(dtype):
    torch.manual_seed(0)
    shapes = {"a": (64, 48), "b": (1001,), "dense": (17, 3)}
    init = {n: torch.randn(s).to(dtype) for n, s in shapes.items()}
    masks = fastmask.select({n: torch.rand(s) for n, s in shapes.items() if n != "dense"}, density=0.1)
    grads = [{n: torch.randn(s).to(dtype) for n, s in shapes.items()} for _ in range(20)]
    runs = {}
    for backend in ("ext", "reference"):
        params = {n: torch.nn.Parameter(x.clone()) for n, x in init.items()}
        opt = fastmask.MaskedAdamW(list(params.values()), lr=1e-2, weight_decay=0.1,
                                   masks={params[n]: masks[n].indices for n in masks})
        with backends.use(backend):
            for g in grads:
                for n, p in params.items():
                    p.grad = g[n].clone()
                opt.step()
        runs[backend] = (params, opt)
    (pe, oe), (pr, orf) = runs["ext"], runs["reference"]
    rtol, atol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-2)}[dtype]
    for n in masks:
        a, b = pe[n].detach(), pr[n].detach()
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        assert not torch.equal(a, init[n]), f"{n}: the step changed nothing"
        sel = masks[n].to_bool().view(-1)
        assert torch.equal(a.view(-1)[~sel], init[n].view(-1)[~sel]), f"{n}: unselected entries changed"
        if dtype == torch.float32:
            assert torch.equal(oe.state[pe[n]]["exp_avg"], orf.state[pr[n]]["exp_avg"])
            assert torch.equal(oe.state[pe[n]]["exp_avg_sq"], orf.state[pr[n]]["exp_avg_sq"])


def test_library_for_another_torch_falls_back_with_warning(tmp_path):
    """A copy of the installed package whose build record names another torch: the loader must
    refuse the library with a warning and the ops must still work (reference backend)."""
    dst = tmp_path / "fastmask"
    shutil.copytree(PKG, dst, ignore=shutil.ignore_patterns("__pycache__"))
    record = dst / "_C_build.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "torch": "2.99.0+other"}))
    code = textwrap.dedent(f"""
        import warnings, torch
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import fastmask
            from fastmask import backends
            chosen = backends.pick("cpu")
        assert fastmask.__file__.startswith({str(tmp_path)!r}), fastmask.__file__
        assert chosen == "reference", chosen
        assert any("built for torch 2.99.0+other" in str(x.message) for x in w), [str(x.message) for x in w]
        p = [torch.randn(10)]; g = [torch.randn(10)]
        idx = torch.tensor([1, 4], dtype=torch.int32)
        fastmask.ops.masked_adamw_step_(p, g, idx, torch.zeros(2), torch.zeros(2), [0, 2], torch.ones(1), 1e-3)
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FASTMASK_EXT_JIT": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
