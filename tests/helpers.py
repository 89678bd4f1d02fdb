"""Helpers shared by the test modules (import them from here, never from conftest or another test file)."""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Iterator, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

import pytest  # noqa: E402

# GPU-only tests: the `gpu` marker pyproject declares (select with -m gpu) plus a skip with the reason.
# `pytestmark = GPU_MARKS` for a module, `@requires_cuda` for one test.
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; none on this machine")]


def requires_cuda(fn):
    """Marks a test ``gpu`` and skips it, saying why, where there is no CUDA GPU."""
    for mark in GPU_MARKS:
        fn = mark(fn)
    return fn

FUSED_FWD = "perceiver_fast::attention_fwd"


class FusedCalls:
    """Counts of our fused custom ops seen while the context was open (``.attention_fwd``)."""

    def __init__(self) -> None:
        self.events: List[str] = []

    @property
    def attention_fwd(self) -> int:
        return sum(1 for name in self.events if name == FUSED_FWD)

    def count(self, name: str) -> int:
        return sum(1 for e in self.events if e == name)


@contextlib.contextmanager
def count_fused_calls() -> Iterator[FusedCalls]:
    """Record which ``perceiver_fast::*`` custom ops ran, from the torch profiler's op events.

    Integration tests use it to prove that the fused path ran, not only that outputs match:
    ``with count_fused_calls() as calls: model(x)`` then ``assert calls.attention_fwd == n``.
    """
    calls = FusedCalls()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yield calls
    calls.events.extend(e.name for e in prof.events() if e.name.startswith("perceiver_fast::"))


class _StubClass(type):
    """A stand-in class: subclassable, usable in isinstance, attributes are enum-like names."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _StubClass(name, (), {"__module__": self.__name__})
        setattr(self, name, value)
        return value


class _TorchvisionStubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


def import_timm():
    """timm, importable on CPU-only machines; skips the test when timm is not installed.

    timm imports torchvision at module level (transforms, FrozenBatchNorm2d), and the registry has no CPU
    build of torchvision. Its ViT never calls torchvision, so when torchvision is absent this installs a
    test-only import hook that stubs it (for this test process only; the package never does this).
    """
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (CI: pip install --no-deps timm)")
    if not any(isinstance(f, _TorchvisionStubFinder) for f in sys.meta_path):
        try:
            has_torchvision = importlib.util.find_spec("torchvision") is not None
        except ImportError:
            has_torchvision = False
        if not has_torchvision:
            sys.meta_path.append(_TorchvisionStubFinder())
    import timm

    return timm


# Tiny models of every family, for the model tests (CPU and GPU); built lazily so helpers imports no model.
def _models():
    from perceiver_fast.models import Perceiver, PerceiverIO, ViT

    return Perceiver, PerceiverIO, ViT


TINY = {
    "perceiver": lambda **kw: _models()[0](image_size=8, patch_size=2, in_channels=1, num_classes=10, num_latents=4,
                                        latent_dim=16, self_heads=2, depth=1, **kw),
    "perceiver-io-learned": lambda **kw: _models()[1](image_size=8, in_channels=1, num_classes=10,
                                                     preprocessing="learned", num_latents=4, latent_dim=16,
                                                     num_blocks=2, num_self_attends_per_block=1, self_heads=2,
                                                     prep_channels=8, pos_channels=8, **kw),
    "perceiver-io-fourier": lambda **kw: _models()[1](image_size=8, in_channels=1, num_classes=10,
                                                     preprocessing="fourier", num_latents=4, latent_dim=16,
                                                     num_blocks=2, num_self_attends_per_block=1, self_heads=2,
                                                     num_bands=3, **kw),
    "perceiver-io-conv": lambda **kw: _models()[1](image_size=12, in_channels=1, num_classes=10,
                                                  preprocessing="conv", num_latents=4, latent_dim=16, num_blocks=1,
                                                  num_self_attends_per_block=1, self_heads=2, prep_channels=4,
                                                  num_bands=2, **kw),
    "vit": lambda **kw: _models()[2](image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=16, depth=2, heads=2,
                            **kw),
}


def images(name: str, b: int = 2) -> torch.Tensor:
    """A random batch of the size the TINY model ``name`` takes."""
    size = 12 if name == "perceiver-io-conv" else 8
    return torch.randn(b, 1, size, size)
