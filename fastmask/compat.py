"""Make ``import torchvision`` (and so ``import open_clip``) work next to a CPU-only torch.

PyPI's torchvision wheels are CUDA builds. Next to a CPU torch their compiled library
(``torchvision/_C.so``) fails to load, and ``import torchvision`` then dies in
``_meta_registrations.py`` with ``operator torchvision::nms does not exist``, because it
registers fake kernels for ``nms``/``qnms`` without first checking that the ops were loaded.
open_clip needs only torchvision's transforms, which are pure Python.

:func:`patch_torchvision` defines the schemas of those two ops (with kernels that raise a clear
error if anything calls them), so the import goes through. It does nothing when torchvision is
absent, already imported, or its compiled library loads: a working torchvision is never touched.
Call it before the first ``import open_clip`` / ``import torchvision``; fastmask's CLI, examples
and tests do.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

__all__ = ["patch_torchvision"]

_lib: torch.library.Library | None = None  # kept alive: the definitions vanish with it
_STUB_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _op_exists(name: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel(f"torchvision::{name}") or bool(
            torch._C._jit_get_schemas_for_operator(f"torchvision::{name}")
        )
    except RuntimeError:
        return False


def patch_torchvision() -> bool:
    """Define torchvision's ``nms``/``qnms`` schemas if its compiled ops cannot load.

    Returns ``True`` if the stubs were defined (now or by an earlier call), ``False`` if nothing
    was needed.
    """
    global _lib
    if _lib is not None:
        return True
    if "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    if all(_op_exists(n) for n in _STUB_OPS):
        return False
    package_dir = list(spec.submodule_search_locations)[0]
    library = next((os.path.join(package_dir, f) for f in sorted(os.listdir(package_dir))
                    if f.startswith("_C.") and f.endswith((".so", ".pyd"))), None)
    if library is not None:
        try:
            torch.ops.load_library(library)  # what torchvision itself would do first
            return False
        except (OSError, RuntimeError):
            pass

    def unavailable(*args, **kwargs):
        raise RuntimeError(
            "torchvision's compiled ops could not be loaded next to this torch build (a CUDA "
            "torchvision wheel with a CPU torch?); fastmask.compat defined placeholders so that "
            "torchvision.transforms imports, but torchvision.ops cannot run here"
        )

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _STUB_OPS.items():
        if not _op_exists(name):
            lib.define(schema)
            lib.impl(name, unavailable, "CompositeExplicitAutograd")
    _lib = lib
    return True
