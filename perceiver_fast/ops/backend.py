"""Which attention backend runs: the one place that decides it.

The ops, the bench and the CLI all ask :func:`attention_backend`. It imports
neither the kernels nor the op wrappers, so both can import it.

* ``"triton"``: CUDA tensors run the Triton kernels;
* ``"triton-interpreter"``: CPU tensors with ``TRITON_INTERPRET=1`` (the test
  suite sets it) run the same kernels under the Triton interpreter, slowly;
* ``"torch"``: other CPU tensors run the PyTorch path.

``TRITON_INTERPRET`` is read when triton compiles a kernel, so it must be set
before perceiver_fast's kernel modules are imported; :func:`interpreter_enabled`
reads it at call time, for the decisions made in Python.
"""
from __future__ import annotations

import os
from typing import Union

import torch

__all__ = ["BACKENDS", "attention_backend", "interpreter_enabled"]

BACKENDS = ("triton", "triton-interpreter", "torch")


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set (Triton kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def attention_backend(device: Union[torch.device, str, torch.Tensor]) -> str:
    """The backend the attention ops use for tensors on ``device`` (a device, its name, or a tensor)."""
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    if device.type == "cuda":
        return "triton"
    if interpreter_enabled():
        return "triton-interpreter"
    return "torch"
