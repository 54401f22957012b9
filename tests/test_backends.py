"""The backend registry: preference, forcing, and honest reasons."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from fastmask import backends, ops

from .utils import make_problem


@pytest.fixture
def fake_backend(monkeypatch):
    """Register a backend module 'fake' that records calls and delegates to the reference."""
    from fastmask import reference

    calls = []
    mod = types.ModuleType("tests_fake_backend")
    mod.reason = None
    mod.why_not = lambda device_type: mod.reason
    mod.masked_adamw_step_ = lambda *a: (calls.append("step"), reference.masked_adamw_step_(*a))
    mod.score_accumulate_ = lambda *a: (calls.append("score"), reference.score_accumulate_(*a))
    monkeypatch.setitem(sys.modules, "tests_fake_backend", mod)
    monkeypatch.setitem(backends._MODULES, "fake", "tests_fake_backend")
    monkeypatch.setitem(backends.PREFERENCE, "cpu", ["fake", "reference"])
    backends._loaded.pop("fake", None)
    yield mod, calls
    backends._loaded.pop("fake", None)


def _score_call():
    ops.score_accumulate_([torch.zeros(3)], [torch.randn(3)], "abs")


def test_reference_runs_everywhere():
    assert backends.why_not("reference", "cpu") is None
    assert backends.why_not("reference", "cuda") is None
    assert "reference" in backends.available("cpu")


def test_preference_order_and_reasons(fake_backend):
    mod, calls = fake_backend
    assert backends.pick("cpu") == "fake"
    _score_call()
    assert calls == ["score"]
    mod.reason = "needs a unicorn"
    assert backends.pick("cpu") == "reference"
    assert "needs a unicorn" in backends.report()


def test_forcing_by_env_and_context(fake_backend, monkeypatch):
    mod, calls = fake_backend
    monkeypatch.setenv("FASTMASK_BACKEND", "reference")
    _score_call()
    assert calls == []
    with backends.use("fake"):  # the context manager wins over the environment
        _score_call()
    assert calls == ["score"]
    assert "forced: reference" in backends.report()


def test_forced_unavailable_backend_raises_with_reason(fake_backend):
    mod, _ = fake_backend
    mod.reason = "needs a unicorn"
    pb = make_problem([(4, 4)], density=0.5)
    before = pb.params[0].clone()
    with backends.use("fake"), pytest.raises(RuntimeError, match="forced.*needs a unicorn"):
        ops.masked_adamw_step_(pb.params, pb.grads, pb.idx, pb.exp_avg, pb.exp_avg_sq, pb.offsets, pb.steps, 1e-3)
    assert torch.equal(pb.params[0], before)


def test_unknown_backend_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="registered: reference"):
        with backends.use("nonesuch"):
            pass
    monkeypatch.setenv("FASTMASK_BACKEND", "nonesuch")
    with pytest.raises(ValueError, match="FASTMASK_BACKEND"):
        _score_call()


def test_import_failure_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "broken", "fastmask._no_such_module")
    backends._loaded.pop("broken", None)
    try:
        reason = backends.why_not("broken", "cpu")
        assert reason is not None and "import of fastmask._no_such_module failed" in reason
        with pytest.raises(RuntimeError, match="cannot be imported"):
            backends.load("broken")
    finally:
        backends._loaded.pop("broken", None)
