"""Helpers shared by the test modules (import them from here, never from conftest or another test file)."""
from __future__ import annotations

import contextlib
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
