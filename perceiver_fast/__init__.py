"""perceiver_fast: fused GPU kernels for the Perceiver, Perceiver IO and ViT.

Public API (imported lazily, so ``import perceiver_fast`` stays cheap and does
not touch Triton until an attention op is first used):

* ops: :func:`cross_attention`, :func:`self_attention`,
  :func:`fourier_features`, :func:`fourier_encode`
* layers: :class:`FourierPositionEncoding` and the modules in
  :mod:`perceiver_fast.layers`
* models: :mod:`perceiver_fast.models`; patches: :mod:`perceiver_fast.integrations`
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "cross_attention": "perceiver_fast.ops.attention",
    "self_attention": "perceiver_fast.ops.attention",
    "fourier_features": "perceiver_fast.ops.fourier",
    "fourier_encode": "perceiver_fast.ops.fourier",
    "FourierPositionEncoding": "perceiver_fast.layers.position",
}
_SUBMODULES = {"ops", "layers", "models", "integrations", "bench", "cli"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"perceiver_fast.{name}")
    raise AttributeError(f"module 'perceiver_fast' has no attribute {name!r}")


def __dir__():
    return __all__
