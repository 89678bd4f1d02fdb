"""Binding a patched forward's arguments by name, the one helper every integration's fused forward uses.

A fused forward receives ``(*args, **kwargs)`` exactly as the caller passed them, decides from the named values
whether the call fuses, and otherwise hands the untouched ``args``/``kwargs`` to the original forward.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple


def bind_call(params: Sequence[Tuple[str, object]], args: tuple, kwargs: dict, required: int) -> Optional[Dict]:
    """The call's arguments by name with the defaults filled in, or None where the original forward would not
    bind them (too many positionals, an unknown or repeated name, a missing required one): the original forward
    then raises its own error.

    ``params``: the forward's parameters after ``self`` as (name, default), in positional order; the first
    ``required`` have no default.
    """
    names = [name for name, _ in params]
    if len(args) > len(names):
        return None
    bound = dict(zip(names, args))
    for name, value in kwargs.items():
        if name not in names or name in bound:
            return None
        bound[name] = value
    if any(name not in bound for name in names[:required]):
        return None
    for name, default in params:
        bound.setdefault(name, default)
    return bound
