"""pytest plugin: a whole test session with every ``torch.nn.MultiheadAttention`` on perceiver_fast's fused path.

tests/test_pio_arch_suite.py runs pio-arch's shipped test suite in a subprocess with ``-p pio_arch_patch_plugin``
(tests/ on PYTHONPATH). At configure time the plugin applies the global patch:

* ``perceiver_fast.integrations.patching.patch_classes()`` when a registered patch covers
  ``nn.MultiheadAttention`` (the framework's class-level patch, as a user would apply it);
* otherwise ``patch_multihead_attention`` on every ``nn.MultiheadAttention`` as it is constructed (a global
  class-level hook on ``__init__``: every instance, present in no model yet or future, is patched).

``PF_PIO_PATCH=classes|instances`` forces one of the two. It counts the fused attention calls (the wrapped
``perceiver_fast.ops.attention`` entry points, looked up at call time by the integrations) and prints
``perceiver_fast patch: <how>; nn.MultiheadAttention calls: <m>; fused attention calls: <n>`` in the terminal
summary. Everything is undone at
unconfigure.
"""
from __future__ import annotations

import functools
import os

from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

STATE: dict = {"calls": 0, "mha_calls": 0, "how": "none", "undo": []}


def counting(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        STATE["calls"] += 1
        return fn(*args, **kwargs)

    return wrapper


def pytest_configure(config) -> None:
    from perceiver_fast.integrations import patch_multihead_attention, patching
    from perceiver_fast.layers import dispatch

    ops = dispatch.fused_ops()
    for name in ("cross_attention", "self_attention"):
        original = getattr(ops, name)
        setattr(ops, name, counting(original))
        STATE["undo"].append(functools.partial(setattr, ops, name, original))

    def count_mha(module, args):
        if isinstance(module, nn.MultiheadAttention):
            STATE["mha_calls"] += 1

    STATE["undo"].append(register_module_forward_pre_hook(count_mha).remove)

    covered = [p.kind for p in patching.ATTENTION_PATCHES + patching.CLASS_ONLY_PATCHES
               if p.resolve() is nn.MultiheadAttention]
    how = os.environ.get("PF_PIO_PATCH") or ("classes" if covered else "instances")
    if how == "classes":
        if not covered:
            raise RuntimeError("PF_PIO_PATCH=classes: no registered patch covers nn.MultiheadAttention")
        handle = patching.patch_classes()  # as a user applies it: every supported class
        STATE["undo"].append(handle.undo)
        STATE["how"] = f"patch_classes() (covers {covered})"
    elif how == "instances":
        original_init = nn.MultiheadAttention.__init__

        @functools.wraps(original_init)
        def __init__(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            if type(self).forward is nn.MultiheadAttention.forward:
                patch_multihead_attention(self)

        nn.MultiheadAttention.__init__ = __init__
        STATE["undo"].append(functools.partial(setattr, nn.MultiheadAttention, "__init__", original_init))
        STATE["how"] = "patch_multihead_attention on every new nn.MultiheadAttention"
    else:
        raise RuntimeError(f"PF_PIO_PATCH must be 'classes' or 'instances', got {how!r}")


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_line(f"perceiver_fast patch: {STATE['how']}; nn.MultiheadAttention calls: "
                                f"{STATE['mha_calls']}; fused attention calls: {STATE['calls']}")


def pytest_unconfigure(config) -> None:
    while STATE["undo"]:
        STATE["undo"].pop()()
