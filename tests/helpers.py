"""Helpers shared by the test modules (import them from here, never from conftest or another test file)."""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Iterator, List

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; none on this machine")

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
