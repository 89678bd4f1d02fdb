"""Which attention backend runs (the one place that decides it), and what every backend shares.

The ops, the bench and the CLI all ask :func:`attention_backend`. It imports
neither the kernels nor the op wrappers, so both can import it.

* ``"triton"``: CUDA tensors run the Triton kernels;
* ``"triton-interpreter"``: CPU tensors with ``TRITON_INTERPRET=1`` (the test
  suite sets it) run the same kernels under the Triton interpreter, slowly;
* ``"torch"``: other CPU tensors run the PyTorch path.

``TRITON_INTERPRET`` is read when triton compiles a kernel, so it must be set
before perceiver_fast's kernel modules are imported; :func:`interpreter_enabled`
reads it at call time, for the decisions made in Python.

Also here, because both the Triton launchers and the PyTorch path need them and
neither may import the other or the op wrappers: :func:`empty` (output buffers,
NaN-poisoned under :func:`poison_outputs`) and :func:`seed_to_int`.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence, Union

import torch

__all__ = ["BACKENDS", "REQUESTS", "attention_backend", "empty", "interpreter_enabled", "poison_outputs", "resolve_backend",
           "seed_to_int"]

BACKENDS = ("triton", "triton-interpreter", "torch")
# What a caller may ask the ops for: "auto" follows attention_backend().
REQUESTS = ("auto", "triton", "torch")
_poison = False


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


def resolve_backend(request: str, t: torch.Tensor) -> str:
    """The backend that runs for a request in :data:`REQUESTS` on tensor ``t``: "triton" or "torch"."""
    if request not in REQUESTS:
        raise ValueError(f"backend must be one of {REQUESTS}, got {request!r}")
    if request == "auto":
        return "torch" if attention_backend(t) == "torch" else "triton"
    return request


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Tests: every buffer the ops allocate starts as NaN, so an element a kernel forgets to write fails."""
    global _poison
    saved, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = saved


def empty(shape: Sequence[int], *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty``, NaN-filled inside :func:`poison_outputs`."""
    t = torch.empty(shape, device=device, dtype=dtype)
    if _poison and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def seed_to_int(seed: Optional[torch.Tensor]) -> int:
    """The dropout seed the ops receive as a 1-element int64 tensor (None without dropout), as an int."""
    return int(seed.item()) if seed is not None else 0
