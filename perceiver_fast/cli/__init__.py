"""The ``perceiver-fast`` command (also ``python -m perceiver_fast``).

    perceiver-fast bench [--quick] [--dtype bfloat16] [--ops pio-learned,sweep] [--models none] [--out DIR]
                         [--compare OLD/results.json]
    perceiver-fast train --model {perceiver,perceiver-io,vit} [--dataset digits | --dataset FILE.npz]
                         [--attention {fused,eager}] [--epochs N] [--out DIR]

User errors (a bad path, a bad array, an out-of-range number, a diverging
loss) print one line ``perceiver-fast: error: ...`` and exit with status 2; no
traceback. Each command lives in its own module (:mod:`.bench`,
:mod:`.train`) with ``add_parser(subparsers)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from perceiver_fast.cli import bench, train
from perceiver_fast.cli.common import UsageError, no_accidental_interpreter

__all__ = ["main", "build_parser", "UsageError"]

COMMANDS = {"bench": bench, "train": train}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perceiver-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{bench,train}")
    sub.required = True
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the command; returns the exit status (2 for a user error, printed as one line)."""
    args = build_parser().parse_args(argv)
    try:
        note = no_accidental_interpreter(getattr(args, "interpret", False))
        if note:
            print(note, file=sys.stderr)
        return COMMANDS[args.command].run(args)
    except UsageError as e:
        print(f"perceiver-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("perceiver-fast: interrupted", file=sys.stderr)
        return 130
