"""The compiled backend: fastmask's C++ (CPU, OpenMP) and CUDA kernels.

The op library ``fastmask_ext`` (``csrc/``) registers backend entry points with the same argument
lists as the public ops of :mod:`fastmask.ops`; this module loads it and forwards to
``torch.ops.fastmask_ext.*``. It never raises on import: a library that is missing, was built for
another torch, or fails to load makes :func:`why_not` return the reason, and dispatch falls back
to the next backend.

Where the library comes from:

* prebuilt: ``fastmask/_C.so`` with its build record ``fastmask/_C_build.json`` (``setup.py``;
  ``pip install --no-build-isolation -e .`` builds it in place). It is loaded only if the record's
  torch version equals the running torch's: a library built against another torch would fail with
  undefined ``c10::`` symbols, or worse, load and misbehave. A mismatch warns once.
* JIT: with ``FASTMASK_EXT_JIT=1`` (or :func:`build_jit`), ninja builds the sources through
  ``torch.utils.cpp_extension.load`` into ``$FASTMASK_CACHE_DIR`` (default ``~/.cache/fastmask``),
  one directory per torch/CUDA/Python combination, and loads the result.
* ``FASTMASK_EXT_DISABLE=1``: never load it.

The CPU kernels are compiled for several instruction sets (AVX-512, AVX2+FMA, baseline) and the
best one the CPU supports is used; ``FASTMASK_CPU_ISA=avx2|default`` caps it. Their results do
not depend on the variant nor on the number of OpenMP threads (``torch.set_num_threads``).
"""
from __future__ import annotations

import glob
import json
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["why_not", "why_not_call", "why_not_op", "masked_adamw_step_", "score_accumulate_", "sampled_weight_grad",
           "build_jit", "info", "load"]

_PKG_DIR = Path(__file__).resolve().parent
_LIB_NAME = "_C"
_BUILD_INFO = "_C_build.json"
_OPS = ("masked_adamw_step_", "score_accumulate_")

_lock = threading.Lock()
_state: dict = {"tried": False, "reason": "not loaded yet", "path": None, "info": None, "source": None}
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _find_prebuilt(lib_dir: Path) -> Path | None:
    for pattern in (f"{_LIB_NAME}.so", f"{_LIB_NAME}.*.so", f"{_LIB_NAME}.pyd", f"{_LIB_NAME}.*.pyd", f"{_LIB_NAME}.dylib"):
        hits = sorted(glob.glob(str(lib_dir / pattern)))
        if hits:
            return Path(hits[0])
    return None


def check_prebuilt(lib_dir: str | os.PathLike = _PKG_DIR) -> tuple[Path | None, dict | None, str | None]:
    """``(library path, build record, reason)`` for the prebuilt library in ``lib_dir``; the reason
    is ``None`` when it may be loaded into this process. Reads files only; loads nothing."""
    lib_dir = Path(lib_dir)
    lib = _find_prebuilt(lib_dir)
    if lib is None:
        return None, None, (f"the compiled extension is not built (no {_LIB_NAME}.so in {lib_dir}); build it with "
                            "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`, "
                            "or set FASTMASK_EXT_JIT=1 to build it with ninja on first use")
    record = lib_dir / _BUILD_INFO
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError) as exc:
        return lib, None, f"{lib.name} has no readable build record ({record.name}: {exc}); rebuild it"
    built = info.get("torch")
    if built != torch.__version__:
        return lib, info, (f"{lib} was built for torch {built}, but torch {torch.__version__} is running; "
                           "rebuild it (pip install --no-build-isolation -e .) or set FASTMASK_EXT_JIT=1")
    return lib, info, None


def _load_library(path: Path, info: dict | None, source: str) -> None:
    torch.ops.load_library(str(path))
    _state.update(path=str(path), info=info, source=source, reason=None)


def load() -> str | None:
    """Load the extension if not done yet; returns the reason it is unavailable (``None``: loaded)."""
    with _lock:
        if _state["tried"]:
            return _state["reason"]
        _state["tried"] = True
        try:
            if os.environ.get("FASTMASK_EXT_DISABLE", "0") not in ("", "0"):
                _state["reason"] = "disabled by FASTMASK_EXT_DISABLE"
            elif os.environ.get("FASTMASK_EXT_JIT", "0") not in ("", "0"):
                _build_jit_locked()
            else:
                lib, info, reason = check_prebuilt()
                if reason is not None:
                    _state["reason"] = reason
                    if lib is not None:  # built, but for something else: say so loudly, once
                        _warn_once(f"fastmask: not loading the compiled extension: {reason}; "
                                   "falling back to another backend")
                else:
                    _load_library(lib, info, "prebuilt")
        except Exception as exc:  # an unloadable library is a reason, never a crash
            _state["reason"] = f"loading the compiled extension failed: {type(exc).__name__}: {exc}"
            _warn_once(f"fastmask: {_state['reason']}; falling back to another backend")
        return _state["reason"]


def _cache_dir() -> Path:
    root = Path(os.environ.get("FASTMASK_CACHE_DIR") or Path.home() / ".cache" / "fastmask")
    cuda = torch.version.cuda if torch.cuda.is_available() or torch.version.cuda else None
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{'cu' + cuda if cuda else 'cpu'}"
    return root / tag.replace("+", "_")


def _sources_dir() -> Path:
    for cand in (_PKG_DIR.parent / "csrc", _PKG_DIR / "csrc"):
        if (cand / "ops.cpp").is_file():
            return cand
    raise FileNotFoundError("the C++ sources (csrc/) are not found beside the fastmask package; "
                            "JIT builds need a source checkout")


def _cuda_toolkit(guess: str | None) -> str | None:
    """The CUDA toolkit to compile with: one whose ``include/cuda_runtime.h`` exists. The same
    search as setup.py's ``find_cuda_home``: ``CUDA_HOME``/``CUDA_PATH`` (taken as given), torch's
    guess, the toolkit ``nvcc`` on PATH belongs to (symlinks resolved, then ``TOP`` from
    ``nvcc --dryrun`` for wrapper scripts), ``/usr/local/cuda``."""
    import re
    import shutil
    import subprocess

    def ok(home):
        return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))

    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit if ok(explicit) else None
    if ok(guess):
        return guess
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if ok(home):
            return home
        try:
            run = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            top = re.search(r"^#\$ TOP=(.+)$", run.stdout + run.stderr, re.M)
        except (OSError, subprocess.SubprocessError):
            top = None
        if top and ok(os.path.normpath(top.group(1).strip())):
            return os.path.normpath(top.group(1).strip())
    return "/usr/local/cuda" if ok("/usr/local/cuda") else None


def _build_jit_locked(verbose: bool = False) -> None:
    from torch.utils import cpp_extension

    src = _sources_dir()
    sources = sorted(str(p) for p in list(src.glob("*.cpp")) + list((src / "cpu").glob("*.cpp")))
    with_cuda = (torch.version.cuda is not None and torch.cuda.is_available()
                 and os.environ.get("FASTMASK_SKIP_CUDA", "0") in ("", "0"))
    if with_cuda:
        cuda_home = _cuda_toolkit(cpp_extension.CUDA_HOME)
        if cuda_home is None:
            _warn_once("fastmask: JIT build without the CUDA kernels: no CUDA toolkit with include/cuda_runtime.h "
                       "found (set CUDA_HOME to the toolkit root)")
            with_cuda = False
        else:
            cpp_extension.CUDA_HOME = cuda_home  # torch's guess is wrong for an nvcc wrapper script
    cflags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fvisibility=hidden"]
    extra = {}
    if with_cuda:
        sources += sorted(str(p) for p in list((src / "cuda").glob("*.cu")) + list((src / "cuda").glob("*.cpp")))
        cflags.append("-DFASTMASK_WITH_CUDA=1")
        extra["extra_cuda_cflags"] = ["-O3", "-lineinfo", "-fmad=false", "--expt-relaxed-constexpr", "-DFASTMASK_WITH_CUDA=1"]
    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    path = cpp_extension.load(
        name="fastmask_ext_jit", sources=sources, extra_cflags=cflags, extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(src)], build_directory=str(build_dir), is_python_module=False,
        with_cuda=with_cuda, verbose=verbose, **extra,
    )
    # load(is_python_module=False) has already loaded the library into the process.
    info = {"torch": torch.__version__, "cuda": torch.version.cuda if with_cuda else None, "jit": True}
    _state.update(path=str(path) if path else str(build_dir), info=info, source="jit", reason=None)


def build_jit(verbose: bool = False) -> str:
    """Build the extension with ninja for the running torch (cached) and load it; returns its path.

    Only possible before a library has been loaded in this process (a loaded op library cannot be
    replaced)."""
    with _lock:
        if _state["reason"] is None and _state["tried"]:
            if _state["source"] == "jit":
                return _state["path"]
            raise RuntimeError(f"the prebuilt extension {_state['path']} is already loaded in this process")
        _state["tried"] = True
        _build_jit_locked(verbose)
        return _state["path"]


def info() -> dict:
    """Where the loaded library came from and what it was built against (empty if not loaded)."""
    if load() is not None:
        return {}
    out = dict(_state["info"] or {})
    out.update(path=_state["path"], source=_state["source"], cpu_isa=torch.ops.fastmask_ext.cpu_isa())
    return out


# --------------------------------------------------------------------------------------------
# backend interface (fastmask.backends)
# --------------------------------------------------------------------------------------------
def why_not(device_type: str) -> str | None:
    reason = load()
    if reason is not None:
        return reason
    if device_type == "cuda" and not torch.cuda.is_available():
        # built with its CUDA kernels or not, they cannot run without a GPU (or the driver torch needs)
        return "no CUDA GPU is available to torch (torch.cuda.is_available() is False)"
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return f"the compiled extension has no kernels for {device_type} tensors (only cpu and cuda)"
    if not all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmask_ext::{op}", key) for op in _OPS):
        if key == "CUDA":
            built = (_state["info"] or {}).get("cuda")
            return ("the compiled extension was built without its CUDA kernels"
                    + (" (torch had no CUDA or nvcc was not found at build time)" if not built else "")
                    + "; rebuild with a CUDA torch and nvcc on PATH")
        return f"the compiled extension has no {device_type} kernels"
    return None


#: Param dtypes the compiled kernels take (state and arithmetic are fp32 whatever the param dtype).
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def why_not_call(param_dtype: torch.dtype, contiguous: bool) -> str | None:
    """Why this backend cannot run a masked step whose params have this dtype and layout (None: it can)."""
    if param_dtype not in _PARAM_DTYPES:
        return f"the compiled kernels take float32/bfloat16/float16 params (got {param_dtype})"
    if not contiguous:
        return ("the compiled kernels take contiguous params and grads (got a strided view); "
                "the reference backend serves this call")
    return None


def masked_adamw_step_(params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, lr, beta1, beta2, eps,
                       weight_decay, maximize, max_exp_avg_sq, grad_scale, found_inf, scores, score_mode) -> None:
    torch.ops.fastmask_ext.masked_adamw_step_(
        params, grads, idx, exp_avg, exp_avg_sq, offsets, steps, lr, beta1, beta2, eps, weight_decay, maximize,
        max_exp_avg_sq, grad_scale, found_inf, scores, score_mode)


def score_accumulate_(scores, grads, score_mode) -> None:
    torch.ops.fastmask_ext.score_accumulate_(scores, grads, score_mode)


def why_not_op(op: str, device_type: str) -> str | None:
    """Why this build has no kernel for ``op`` on ``device_type`` (None: it has one)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if not hasattr(torch.ops.fastmask_ext, op):
        return f"the loaded extension has no {op} (built from older sources: rebuild it)"
    if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmask_ext::{op}", key):
        return f"the compiled extension has no {device_type} kernel for {op}"
    return None


def sampled_weight_grad(grad_out, input, idx):
    return torch.ops.fastmask_ext.sampled_weight_grad(grad_out, input, idx)


# Load (or build) at import, so `backends` learns the reason at once; never raises.
load()

