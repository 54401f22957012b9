"""fastmask.compat.patch_torchvision: torchvision/open_clip import next to a CPU torch."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastmask.compat
from fastmask.compat import patch_torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _torchvision_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


needs_torchvision = pytest.mark.skipif(not _torchvision_installed(), reason="torchvision is not installed")


def run_fresh(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the repository on sys.path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@functools.lru_cache(maxsize=None)
def _import_fails_unpatched() -> tuple[bool, str]:
    r = run_fresh("import torchvision")
    return r.returncode != 0, r.stderr


@needs_torchvision
def test_import_torchvision_and_open_clip_after_patch():
    import torchvision
    import torchvision.transforms as T

    import open_clip

    assert hasattr(open_clip, "create_model")
    img = torch.rand(3, 20, 24)
    out = T.Normalize(mean=[0.5] * 3, std=[0.25] * 3)(img)
    torch.testing.assert_close(out, (img - 0.5) / 0.25)
    assert torchvision.__version__


@needs_torchvision
def test_patch_is_idempotent():
    first = patch_torchvision()
    for _ in range(3):
        assert patch_torchvision() == first, "patch_torchvision() must give the same answer when called again"
    lib = fastmask.compat._lib
    patch_torchvision()
    assert fastmask.compat._lib is lib, "a second call must not redefine the stubs"


@needs_torchvision
def test_stub_nms_raises_clear_error():
    if fastmask.compat._lib is None:
        pytest.skip("torchvision's compiled ops load here: no stubs were defined")
    dets = torch.rand(5, 4)
    scores = torch.rand(5)
    with pytest.raises(RuntimeError, match=r"torchvision's compiled ops could not be loaded.*torchvision\.ops cannot run"):
        torch.ops.torchvision.nms(dets, scores, 0.5)
    with pytest.raises(RuntimeError, match="compiled ops could not be loaded"):
        torch.ops.torchvision.qnms(dets, scores, 0.5)


@needs_torchvision
def test_fresh_interpreter_import_fails_without_patch():
    failed, stderr = _import_fails_unpatched()
    if not failed:
        pytest.skip("import torchvision works here without the patch")
    assert "torchvision::nms" in stderr, f"unexpected failure of the unpatched import:\n{stderr[-2000:]}"


@needs_torchvision
def test_fresh_interpreter_import_works_with_patch():
    failed, _ = _import_fails_unpatched()
    r = run_fresh(
        """
        import fastmask.compat
        first = fastmask.compat.patch_torchvision()
        second = fastmask.compat.patch_torchvision()
        import torchvision, torchvision.transforms
        import open_clip
        third = fastmask.compat.patch_torchvision()
        print("RESULT", first, second, third)
        """
    )
    assert r.returncode == 0, f"import failed even with the patch:\n{r.stderr[-3000:]}"
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")]
    assert line, r.stdout
    first, second, third = line[0].split()[1:]
    if failed:
        assert (first, second, third) == ("True", "True", "True"), line[0]
    else:
        assert first == second == third == "False", f"a working torchvision must not be patched: {line[0]}"


def test_fresh_interpreter_patch_after_torchvision_imported_does_nothing():
    r = run_fresh(
        """
        import sys, types
        sys.modules["torchvision"] = types.ModuleType("torchvision")  # 'already imported'
        import fastmask.compat
        print("RESULT", fastmask.compat.patch_torchvision(), fastmask.compat._lib is None)
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RESULT False True" in r.stdout, r.stdout


def test_fresh_interpreter_patch_without_torchvision_does_nothing():
    r = run_fresh(
        """
        import importlib.util, sys
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a, **k: None if name == "torchvision" else real(name, *a, **k)
        import fastmask.compat
        print("RESULT", fastmask.compat.patch_torchvision())
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RESULT False" in r.stdout, r.stdout
