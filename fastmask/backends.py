"""Backend registry: which implementations of the fastmask ops exist here, and why not.

A backend is a module that defines the op kernels with the schemas' signatures
(``masked_adamw_step_``, ``score_accumulate_``) and ``why_not(device_type) -> str | None``, the
reason it cannot serve tensors of that device type (``None`` when it can). Backends are imported
lazily, the first time one is asked for; an import failure becomes its reason.

A backend may also define ``why_not_call(param_dtype, contiguous) -> str | None``: why it cannot
serve a masked step on params of that dtype and layout (the compiled kernels take contiguous
float32/bfloat16/float16 params and grads; the reference takes every real floating dtype and any
strided layout). Not every backend has every op (an out-of-tree one may lack
``sampled_weight_grad``): a backend without a kernel for a call's op (:attr:`Call.op`; a module may also
define ``why_not_op(op, device_type)``) is skipped for that call.

Dispatch, per device type and call (:class:`Call`), takes the first available backend in
:data:`PREFERENCE` that can serve the call; the ``reference`` backend runs anywhere, on anything,
and closes every list. ``FASTMASK_BACKEND=<name>`` (or the
:func:`use` context manager) forces one backend; if it cannot serve the call, the call raises
with its reason rather than silently running something else.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

__all__ = ["Call", "register", "names", "load", "why_not", "available", "forced", "pick", "resolve", "use", "report", "PREFERENCE"]

#: Backend name -> module implementing it.
_MODULES: dict[str, str] = {
    "reference": "fastmask.reference",
    "ext": "fastmask._ext",
    "triton": "fastmask.kernels",
}
#: Preference order per device type (names not registered are skipped); other device types use
#: ``"*"``. Triton serves CPU tensors only when forced under ``TRITON_INTERPRET=1`` (tests).
PREFERENCE: dict[str, list[str]] = {
    "cuda": ["ext", "triton", "reference"],
    "cpu": ["ext", "reference"],
    "*": ["reference"],
}

_loaded: dict[str, ModuleType | BaseException] = {}
#: The ops a backend may implement (fastmask.ops defines them).
OPS = ("masked_adamw_step_", "score_accumulate_", "sampled_weight_grad")


@dataclass(frozen=True)
class Call:
    """What one op call needs from a backend beyond its device type."""

    dtype: object = None  # param dtype (torch.dtype)
    contiguous: bool = True  # params and grads all contiguous
    op: str = "masked_adamw_step_"  # which op: a backend without a kernel for it cannot serve the call


_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastmask_backend", default=None)
ENV_VAR = "FASTMASK_BACKEND"


def register(name: str, module: str, prefer_for: dict[str, int] | None = None) -> None:
    """Add a backend (e.g. an out-of-tree one). ``prefer_for`` maps device types to its position
    in their preference list."""
    _MODULES[name] = module
    _loaded.pop(name, None)
    for device_type, position in (prefer_for or {}).items():
        order = PREFERENCE.setdefault(device_type, list(PREFERENCE["*"]))
        if name in order:
            order.remove(name)
        order.insert(position, name)


def _order(device_type: str) -> list[str]:
    return [n for n in PREFERENCE.get(device_type, PREFERENCE["*"]) if n in _MODULES]


def names() -> list[str]:
    """All registered backend names."""
    return list(_MODULES)


# Subpackages that live outside fastmask/ in a source checkout (setup.py maps them when installing).
_SOURCE_DIRS = {"fastmask.kernels": "kernels"}


def _import(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module or module not in _SOURCE_DIRS:
            raise
        # Running from a source checkout that was not installed: kernels/ sits beside fastmask/.
        init = Path(__file__).resolve().parent.parent / _SOURCE_DIRS[module] / "__init__.py"
        if not init.is_file():
            raise
        spec = importlib.util.spec_from_file_location(module, init, submodule_search_locations=[str(init.parent)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module] = mod
        try:
            spec.loader.exec_module(mod)  # type: ignore[union-attr]
        except BaseException:
            del sys.modules[module]
            raise
        return mod


def _load(name: str) -> ModuleType | BaseException:
    if name not in _loaded:
        try:
            _loaded[name] = _import(_MODULES[name])
        except Exception as exc:  # an import failure is this backend's reason, never a crash
            _loaded[name] = exc
    return _loaded[name]


def load(name: str) -> ModuleType:
    """The module of backend ``name``; raises ``RuntimeError`` with the reason if it cannot load."""
    if name not in _MODULES:
        raise ValueError(f"unknown fastmask backend {name!r}; registered: {', '.join(_MODULES)}")
    mod = _load(name)
    if isinstance(mod, BaseException):
        raise RuntimeError(f"fastmask backend {name!r} cannot be imported: {type(mod).__name__}: {mod}") from mod
    return mod


def why_not(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot serve tensors on ``device_type`` (``None``: it can)."""
    if name not in _MODULES:
        raise ValueError(f"unknown fastmask backend {name!r}; registered: {', '.join(_MODULES)}")
    mod = _load(name)
    if isinstance(mod, BaseException):
        return f"import of {_MODULES[name]} failed: {type(mod).__name__}: {mod}"
    return mod.why_not(device_type)


def why_not_call(name: str, device_type: str, call: Call | None) -> str | None:
    """Why backend ``name`` cannot serve ``call`` on ``device_type`` (``None``: it can)."""
    reason = why_not(name, device_type)
    if reason is not None or call is None:
        return reason
    mod = _loaded[name]
    if not callable(getattr(mod, call.op, None)):
        return f"no kernel for {call.op}"
    op_check = getattr(mod, "why_not_op", None)
    reason = None if op_check is None else op_check(call.op, device_type)
    if reason is not None or call.dtype is None:
        return reason
    check = getattr(mod, "why_not_call", None)
    return None if check is None else check(call.dtype, call.contiguous)


def available(device_type: str) -> list[str]:
    """Backends that can serve ``device_type``, in preference order."""
    return [n for n in _order(device_type) if why_not(n, device_type) is None]


def forced() -> str | None:
    """The backend forced by :func:`use` or ``FASTMASK_BACKEND``, if any."""
    name = _forced.get() or os.environ.get(ENV_VAR) or None
    if name is not None and name not in _MODULES:
        raise ValueError(f"{ENV_VAR}={name!r} names no backend; registered: {', '.join(_MODULES)}")
    return name


def pick(device_type: str, call: Call | None = None) -> str:
    """The name of the backend that serves an op call on ``device_type`` (and ``call``'s needs)."""
    name = forced()
    if name is not None:
        reason = why_not_call(name, device_type, call)
        if reason is not None:
            raise RuntimeError(f"fastmask backend {name!r} was forced but cannot run this call on {device_type} "
                               f"tensors: {reason}")
        return name
    reasons = []
    for n in _order(device_type):
        reason = why_not_call(n, device_type, call)
        if reason is None:
            return n
        reasons.append(f"{n}: {reason}")
    raise RuntimeError(f"no fastmask backend can run on {device_type} tensors:\n  " + "\n  ".join(reasons))


def resolve(device_type: str, call: Call | None = None) -> ModuleType:
    """The backend module that serves an op call on ``device_type`` (and ``call``'s needs)."""
    return _loaded[pick(device_type, call)]  # type: ignore[return-value]


@contextlib.contextmanager
def use(name: str):
    """Force backend ``name`` inside a ``with`` block (takes precedence over ``FASTMASK_BACKEND``)."""
    if name not in _MODULES:
        raise ValueError(f"unknown fastmask backend {name!r}; registered: {', '.join(_MODULES)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _call_limits(name: str) -> str:
    """Which masked-step calls backend ``name`` serves (the others fall through to the next one)."""
    import torch

    check = getattr(_loaded[name], "why_not_call", None)
    if check is None:
        return "masked step on every real floating dtype and layout"
    taken = [str(d).replace("torch.", "") for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
             if check(d, True) is None]
    strided = check(torch.float32, False) is None
    return (f"masked step on {'/'.join(taken) or 'no'} params, {'any layout' if strided else 'contiguous only'}; "
            "other calls fall through to the next backend")


def report(device_types: tuple[str, ...] = ("cpu", "cuda")) -> str:
    """A readable table: for each backend and device type, ``ok`` or the reason it is unavailable."""
    lines = []
    for device_type in device_types:
        try:
            chosen = pick(device_type)
        except (RuntimeError, ValueError) as exc:
            chosen = f"none ({exc})"
        absent = ""
        if device_type == "cuda":
            import torch

            if not torch.cuda.is_available():
                absent = " (if it had a CUDA device: this machine has none)"
        lines.append(f"{device_type}: dispatches to {chosen}{absent}")
        for n in _MODULES:
            reason = why_not(n, device_type)
            if reason is None:
                limits = _call_limits(n)
                missing = [op for op in OPS if why_not_call(n, device_type, Call(op=op)) is not None]
                if missing:
                    limits += f"; no kernel for {', '.join(missing)}"
                lines.append(f"  {n:<10} ok{': ' + limits if limits else ''}")
            else:
                lines.append(f"  {n:<10} unavailable: {reason}")
    name = forced()
    if name:
        lines.append(f"forced: {name}")
    return "\n".join(lines)
