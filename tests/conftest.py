"""Test set-up.

Without a GPU the Triton kernels run under the Triton interpreter on CPU
tensors. TRITON_INTERPRET must be set before any kernel module is imported,
which is why this happens here, before perceiver_fast is imported anywhere.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
