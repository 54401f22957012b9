"""Test-session set-up: the torchvision compat step runs before anything imports open_clip."""
import pytest
import torch

import fastmask.compat

fastmask.compat.patch_torchvision()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
