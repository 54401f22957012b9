"""fastmask's Triton backend (shipped as ``fastmask.kernels``).

Implements the ops of :mod:`fastmask.ops` with the schemas' signatures, one Triton kernel per
op, each serving every tensor of a call in a single launch. On CUDA devices it needs Triton and
a GPU; on the CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
this package is imported), which is how the tests exercise it without a GPU.
"""
from __future__ import annotations

try:
    import triton  # noqa: F401
except Exception as exc:  # import failure becomes this backend's reason, never a crash
    _IMPORT_ERROR: BaseException | None = exc
else:
    _IMPORT_ERROR = None

__all__ = ["why_not", "why_not_call", "masked_adamw_step_", "score_accumulate_", "sampled_weight_grad"]


def why_not(device_type: str) -> str | None:
    """Why this backend cannot serve tensors on ``device_type`` (``None``: it can)."""
    if _IMPORT_ERROR is not None:
        return f"triton cannot be imported ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR})"
    from ._utils import INTERPRETED

    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "no CUDA/ROCm GPU is available to torch"
        return None
    if device_type == "cpu":
        if INTERPRETED:
            return None
        return ("Triton compiles for GPUs only; CPU tensors run only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before fastmask.kernels is imported; slow, for tests)")
    return f"Triton kernels here target CUDA GPUs (and the CPU interpreter), not {device_type!r} tensors"


def why_not_call(param_dtype: torch.dtype, contiguous: bool) -> str | None:
    """Why this backend cannot run a masked step whose params have this dtype and layout (None: it can)."""
    import torch

    if param_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the Triton kernels take float32/bfloat16/float16 params (got {param_dtype})"
    if not contiguous:
        return ("the Triton kernels take contiguous params and grads (got a strided view); "
                "the reference backend serves this call")
    return None


if _IMPORT_ERROR is None:
    from .masked_adamw import masked_adamw_step_
    from .score_accumulate import score_accumulate_
    from .sampled_grad import sampled_weight_grad
else:
    def _unavailable(*args, **kwargs):
        raise RuntimeError(why_not("cuda"))

    masked_adamw_step_ = score_accumulate_ = sampled_weight_grad = _unavailable
