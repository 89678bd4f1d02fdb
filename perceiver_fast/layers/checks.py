"""Argument checks for the layer and model constructors.

An impossible config (``heads=0``, ``image_size=8.7``, ``depth=-1``) is refused
when the module is built, with the argument's name, instead of failing in the
first forward (or, worse, building an empty or silently truncated model).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

__all__ = ["check_int", "check_float", "check_size_pair"]


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= minimum; TypeError for a non-integer (bool, 8.7), ValueError below minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value, minimum: float = 0.0, maximum: Optional[float] = None, *,
                include_minimum: bool = True, include_maximum: bool = True) -> float:
    """``value`` as a finite float within [minimum, maximum]; ``include_*=False`` makes that end open."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    low_ok = value >= minimum if include_minimum else value > minimum
    high_ok = maximum is None or (value <= maximum if include_maximum else value < maximum)
    if not (math.isfinite(value) and low_ok and high_ok):
        bounds = f"{'>=' if include_minimum else '>'} {minimum:g}"
        if maximum is not None:
            bounds += f" and {'<=' if include_maximum else '<'} {maximum:g}"
        raise ValueError(f"{name} must be a finite number {bounds}, got {value:g}")
    return value


def check_size_pair(name: str, value, minimum: int = 1) -> Tuple[int, int]:
    """An int or an (H, W) pair of ints, each >= minimum, as a tuple (lists too: JSON configs hold lists)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair (H, W), got {tuple(value)}")
        return check_int(f"{name}[0]", value[0], minimum), check_int(f"{name}[1]", value[1], minimum)
    n = check_int(name, value, minimum)
    return n, n
