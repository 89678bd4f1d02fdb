"""The ``perceiver-fast`` command (also ``python -m perceiver_fast``).

    perceiver-fast bench [--quick] [--dtype bfloat16] [--ops pio-learned,sweep] [--models none] [--out DIR]
    perceiver-fast train --model {perceiver,perceiver-io,vit} [--dataset digits | --dataset FILE.npz]
                         [--attention {fused,eager}] [--epochs N] [--out DIR]

User errors (a bad path, a bad array, an unknown name) print one line
``perceiver-fast: error: ...`` and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


class UsageError(Exception):
    """An error in what the user asked for; printed as one line, exit status 2."""


def _split(value: Optional[str]) -> Optional[List[str]]:
    """'a,b' -> ['a', 'b']; 'all' -> None (everything); 'none' -> []."""
    if value is None or value.strip().lower() == "all":
        return None
    if value.strip().lower() == "none":
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def resolve_device(arg: Optional[str]) -> str:
    """--device: 'cpu', 'cuda' or 'cuda:N' (default: cuda when torch sees a GPU). Raises UsageError for a
    device string torch does not parse, another device type, or a CUDA device that is not there."""
    import torch

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(arg)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {arg!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {arg!r}: only cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {arg} asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {arg}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def prepare_out_dir(path: str, flag: str = "--out") -> str:
    """Creates the output folder up front (not after minutes of work); UsageError if it cannot."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path!r}: cannot create the folder: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r}: the folder is not writable")
    return path


def _no_accidental_interpreter(keep: bool) -> Optional[str]:
    """Without a GPU, TRITON_INTERPRET=1 (set by the test suite, or left in a shell) would run the
    Triton kernels in the slow interpreter. Unless asked to keep it, drop it before the kernels are
    imported, so the ops take their PyTorch fallback. Returns a note to print, or None."""
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        return None
    if keep:
        return "TRITON_INTERPRET=1: the fused ops run the Triton interpreter (slow)."
    if "perceiver_fast.ops.attention_triton" in sys.modules:
        return "TRITON_INTERPRET=1 was set before the kernels were imported: the fused ops run the interpreter."
    del os.environ["TRITON_INTERPRET"]
    return "note: ignoring TRITON_INTERPRET=1 (pass --interpret to keep it); fused ops use their CPU fallback."


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the ops and models against eager PyTorch and SDPA",
                       description="Benchmark the fused ops and models against eager PyTorch, every SDPA backend "
                                   "that accepts the shape, torch.compile and HF/timm models. Writes results.csv, "
                                   "results.json, table.txt, targets.md and PNG plots to --out.")
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    p.add_argument("--quick", action="store_true", help="a few shapes, shorter timing")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="attention/model dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--ops", default="all",
                   help="comma-separated op cases: attention shape names, 'fourier', 'sweep', 'layers'; 'all' or "
                        "'none'")
    p.add_argument("--models", default="all", help="comma-separated model cases; 'all' or 'none'")
    p.add_argument("--backends", default="all", help="comma-separated backends (eager, compile, sdpa-flash, "
                                                     "sdpa-efficient, sdpa-cudnn, sdpa-math, fused, hf, ours, ...)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile baselines for attention too (default: only for the Fourier encoder, "
                        "on a GPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new cases after this many seconds (the rest is recorded as SKIP)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--list", action="store_true", help="list the shapes with FLOPs, bytes and H200 floor; run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--interpret", action="store_true", help="keep TRITON_INTERPRET=1 on a CPU machine")


def _train_parser(sub) -> None:
    from perceiver_fast.train import add_train_arguments

    p = sub.add_parser("train", help="train a model with the fused layers (default: sklearn digits)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train a Perceiver, Perceiver IO or ViT on sklearn's bundled digits or on an "
                                   ".npz (x: N x H x W x C uint8, y: N int). Saves a loss/accuracy plot, a "
                                   "checkpoint and metrics to --out. Under torchrun it trains with DDP.")
    add_train_arguments(p)
    p.add_argument("--interpret", action="store_true", help="keep TRITON_INTERPRET=1 on a CPU machine")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perceiver-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{bench,train}")
    sub.required = True
    _bench_parser(sub)
    _train_parser(sub)
    return parser


def list_shapes() -> str:
    from perceiver_fast.bench import shapes as S

    out = [f"{'case':<58} {'GFLOP fwd':>10} {'MB fwd':>8} {'floor fwd ms':>12} {'floor f+b ms':>12}  (bf16, H200 ceilings)"]
    for s in S.ATTN_SHAPES:
        out.append(f"{s.label():<58} {s.flops() / 1e9:>10.1f} {s.bytes() / 1e6:>8.1f} {s.floor_ms():>12.4f} "
                   f"{s.floor_ms(backward=True):>12.4f}")
    for f in S.FOURIER_SHAPES:
        out.append(f"{f.label():<58} {0:>10} {f.bytes() / 1e6:>8.1f} {f.floor_ms():>12.4f} {'':>12}  (fp32)")
    return "\n".join(out)


def _bench(args) -> int:
    from perceiver_fast.bench import shapes as S

    if args.list:
        print(list_shapes())
        return 0
    import torch

    ops = _split(args.ops)
    known_ops = [s.name for s in S.ATTN_SHAPES] + ["fourier", "sweep", "layers"]
    for o in ops or []:
        if o not in known_ops:
            raise UsageError(f"unknown op case {o!r}; known: {', '.join(known_ops)}")
    models = _split(args.models)
    known_models = [c.name for c in S.MODEL_CASES]
    for m in models or []:
        if m not in known_models:
            raise UsageError(f"unknown model case {m!r}; known: {', '.join(known_models)}")
    device = resolve_device(args.device)
    if torch.device(device).type == "cuda" and torch.device(device).index is not None:
        torch.cuda.set_device(device)  # GPU name, free memory and synchronize follow the current device

    from perceiver_fast.bench.report import format_table, targets_markdown, write_all
    from perceiver_fast.bench.runner import BenchOptions, known_backends, run

    backends = _split(args.backends)
    for b in backends or []:
        if b not in known_backends():
            raise UsageError(f"unknown backend {b!r}; known: {', '.join(known_backends())}")
    prepare_out_dir(args.out)

    opts = BenchOptions(device=device, dtype=args.dtype, quick=args.quick, ops=ops, models=models,
                        backends=backends, backward=not args.no_backward, compile=args.compile,
                        budget_s=args.budget_s, progress=not args.no_progress)
    result = run(opts)
    paths = write_all(result, args.out)
    print(format_table(result))
    print()
    print(targets_markdown(result))
    if result["env"]["fused_path"] != "triton":
        print(f"No GPU: the Triton kernels need a CUDA GPU. The 'fused' rows above timed the "
              f"{result['env']['fused_path']} path on {result['env']['device']}, at small sizes.")
    print(f"wrote {', '.join(paths[k] for k in sorted(paths))} ({result['env']['elapsed_s']} s)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        note = _no_accidental_interpreter(getattr(args, "interpret", False))
        if note:
            print(note, file=sys.stderr)
        if args.command == "bench":
            return _bench(args)
        from perceiver_fast.train import train_from_args

        train_from_args(args)
        return 0
    except UsageError as e:
        print(f"perceiver-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("perceiver-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
