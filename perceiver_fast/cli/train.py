"""``perceiver-fast train``: the command line of :func:`perceiver_fast.train.train`.

The library raises ordinary exceptions naming the argument (``lr must be ...``);
this module turns them into one-line errors naming the flag (``--lr must be ...``).
"""
from __future__ import annotations

import argparse
import dataclasses
import re

from perceiver_fast.cli.common import UsageError, add_interpret_flag

# The train library imports numpy, torch and the models: imported in run(), not here, so that
# `perceiver-fast bench --list` works with only torch and triton installed.
MODELS = ("perceiver", "perceiver-io", "vit")
SIZES = ("default", "tiny")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model with the fused layers (default: sklearn digits)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train a Perceiver, Perceiver IO or ViT on sklearn's bundled digits or on an "
                                   ".npz (x: N x H x W x C uint8, y: N int). Writes a from_pretrained folder "
                                   "(config.json, model.safetensors) after every epoch, metrics and a plot to "
                                   "--out. Under torchrun it trains with DDP.")
    p.add_argument("--model", choices=MODELS, default="vit", help="model family")
    p.add_argument("--dataset", default="digits", help="'digits' (sklearn, bundled) or a .npz with x (N,H,W,C "
                                                       "uint8) and y (N int)")
    p.add_argument("--attention", choices=["fused", "eager"], default="fused",
                   help="fused ops (Triton on a GPU, their PyTorch path on a CPU) or eager attention")
    p.add_argument("--epochs", type=int, default=60, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="instead of --batch-size: one global batch, split evenly across the torchrun processes "
                        "(the world size must divide it); the run then matches one process with this batch")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (warm-up, cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (matrices only)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length")
    p.add_argument("--shift", type=int, default=1, help="random-translation augmentation in pixels (0: off)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of the data")
    p.add_argument("--seed", type=int, default=0, help="split, init and shuffling seed (0 .. 2**32-1)")
    p.add_argument("--size", choices=SIZES, default="default", help="model size preset")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="runs/train", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_interpret_flag(p)


def _flag_names(message: str, fields) -> str:
    """'lr must be > 0' -> '--lr must be > 0': the library's messages start with the field, the user typed flags."""
    first = re.match(r"\w+", message)
    if first and first.group(0) in fields:
        return "--" + first.group(0).replace("_", "-") + message[first.end():]
    return message


def run(args: argparse.Namespace) -> int:
    from perceiver_fast.train import NonFiniteLossError, TrainConfig, fit, prepare

    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    cfg = TrainConfig(**{k: getattr(args, k) for k in fields})
    # Only the checks before any work become one-line errors; a failure during training keeps its traceback.
    try:
        prepared = prepare(cfg)
    except (ValueError, TypeError) as e:
        raise UsageError(_flag_names(str(e), fields)) from None
    except ImportError as e:
        raise UsageError(str(e)) from None
    try:
        fit(prepared)
    except NonFiniteLossError as e:
        raise UsageError(str(e)) from None
    return 0
