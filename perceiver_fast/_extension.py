"""Loader of perceiver_fast._C, the C++/CUDA extension behind torch.ops.perceiver_fast.*.

setup.py builds it (``pip install --no-build-isolation -e .``). The CMake build
makes an equivalent library for C++ users and ctest; never load both into one
process: they register the same operator library.
"""
from __future__ import annotations

import functools

import torch

BUILD_HINT = "run `pip install --no-build-isolation -e .` in the perceiver_fast checkout"
CUDA_BUILD_HINT = (
    "rebuild on a machine with nvcc and a CUDA build of torch: "
    "`pip install --no-build-isolation -e .` (PERCEIVER_FAST_FORCE_CUDA=1 forces the CUDA "
    "kernels, PERCEIVER_FAST_CUDA_ARCHS='80;90' picks the GPU architectures)"
)

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@functools.lru_cache(maxsize=None)
def load():
    """Imports the extension once and returns ``torch.ops.perceiver_fast``."""
    try:
        from perceiver_fast import _C  # noqa: F401  (registers the ops)
    except ImportError as exc:
        raise ImportError(f"perceiver_fast's C++ extension is not built: {BUILD_HINT} ({exc})") from exc
    return torch.ops.perceiver_fast


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether the extension has a kernel of ``perceiver_fast::op_name`` for a device type."""
    load()
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"perceiver_fast::{op_name}", key)


def cuda_available() -> bool:
    """Whether the CUDA kernels were compiled into the extension."""
    return has_kernel("fourier_encode", "cuda")


def check_device(op_name: str, device: torch.device) -> None:
    """Raises a clear error when ``device`` has no kernel of this op in the build."""
    if torch.compiler.is_compiling():
        return  # checked when the eager call is made; dynamo cannot trace the dispatcher query
    device = torch.device(device)
    if device.type == "meta" or has_kernel(op_name, device.type):
        return
    if device.type == "cuda":
        raise RuntimeError(
            f"perceiver_fast::{op_name} got a CUDA tensor, but this build of perceiver_fast has no CUDA "
            f"kernels (built with a CPU-only torch, without nvcc, or with PERCEIVER_FAST_SKIP_CUDA=1); "
            f"{CUDA_BUILD_HINT}"
        )
    raise RuntimeError(
        f"perceiver_fast::{op_name} has no kernel for device {device}; only CPU and CUDA are supported"
    )
