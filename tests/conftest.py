"""Test-session set-up.

- The torchvision compat step runs before anything imports open_clip.
- Without a GPU, Triton kernels run in the interpreter on CPU tensors; ``TRITON_INTERPRET`` must
  be set before ``triton.jit`` decorates them, so before any test imports them.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastmask.compat

fastmask.compat.patch_torchvision()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
