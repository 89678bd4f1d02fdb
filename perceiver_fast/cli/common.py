"""What the commands share: the one-line error type, list flags and the interpreter guard."""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from perceiver_fast.ops.backend import interpreter_enabled

__all__ = ["UsageError", "split_list", "add_interpret_flag", "no_accidental_interpreter"]


class UsageError(Exception):
    """An error in what the user asked for; printed as one line, exit status 2."""


def split_list(value: Optional[str]) -> Optional[List[str]]:
    """'a,b' -> ['a', 'b']; 'all' -> None (everything); 'none' -> []."""
    if value is None or value.strip().lower() == "all":
        return None
    if value.strip().lower() == "none":
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def add_interpret_flag(parser) -> None:
    parser.add_argument("--interpret", action="store_true", help="keep TRITON_INTERPRET=1 on a CPU machine")


def no_accidental_interpreter(keep: bool) -> Optional[str]:
    """Without a GPU, TRITON_INTERPRET=1 (set by the test suite, or left in a shell) would run the
    Triton kernels in the slow interpreter. Unless asked to keep it, drop it before the kernels are
    imported, so the ops take their PyTorch path. Returns a note to print, or None."""
    import torch

    if torch.cuda.is_available() or not interpreter_enabled():
        return None
    if keep:
        return "TRITON_INTERPRET=1: the fused ops run the Triton interpreter (slow)."
    if "perceiver_fast.ops.attention_triton" in sys.modules:
        return "TRITON_INTERPRET=1 was set before the kernels were imported: the fused ops run the interpreter."
    del os.environ["TRITON_INTERPRET"]
    return "note: ignoring TRITON_INTERPRET=1 (pass --interpret to keep it); fused ops use their CPU path."
