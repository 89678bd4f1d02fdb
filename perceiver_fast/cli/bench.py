"""``perceiver-fast bench``: the command line of :func:`perceiver_fast.bench.runner.run`."""
from __future__ import annotations

import argparse
from typing import List, Optional

from perceiver_fast.cli.common import UsageError, add_interpret_flag, split_list


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the ops and models against eager PyTorch and SDPA",
                       description="Benchmark the fused ops and models against eager PyTorch, every SDPA backend "
                                   "that accepts the shape, torch.compile and HF/timm models. Writes results.csv, "
                                   "results.json, table.txt, targets.md and PNG plots to --out.")
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    p.add_argument("--quick", action="store_true", help="a few shapes, shorter timing")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="attention/model dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--ops", default="all",
                   help="comma-separated op cases: attention shape names, 'fourier', 'sweep', 'headdim', 'fit', "
                        "'layers'; 'all' or 'none'")
    p.add_argument("--models", default="all", help="comma-separated model cases; 'all' or 'none'")
    p.add_argument("--peer", default="auto",
                   help="community models patched by patch_model against unpatched: comma-separated peer cases "
                        "(see --list), 'all' or 'none' (default: all when --ops and --models are left at 'all', "
                        "none when they name a subset)")
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
    p.add_argument("--compare", metavar="OLD/results.json", default=None,
                   help="print each case's change in time against an earlier run; exit 1 if any case is slower "
                        "than --threshold")
    p.add_argument("--threshold", type=float, default=0.10,
                   help="--compare: the slowdown (0.10 = 10%%) past which the command fails")
    add_interpret_flag(p)


def list_shapes() -> str:
    """The attention and Fourier shapes with their FLOPs, bytes and H200 floors, and the peer cases (``--list``)."""
    from perceiver_fast.bench import shapes as S

    out = [f"{'case':<58} {'GFLOP fwd':>10} {'MB fwd':>8} {'floor fwd ms':>12} {'floor f+b ms':>12}  (bf16, H200 ceilings)"]
    for s in S.ATTN_SHAPES:
        out.append(f"{s.label():<58} {s.flops() / 1e9:>10.1f} {s.bytes() / 1e6:>8.1f} {s.floor_ms():>12.4f} "
                   f"{s.floor_ms(backward=True):>12.4f}")
    for f in S.FOURIER_SHAPES:
        out.append(f"{f.label():<58} {0:>10} {f.bytes() / 1e6:>8.1f} {f.floor_ms():>12.4f} {'':>12}  (fp32)")
    from perceiver_fast.bench.peer import list_peer_cases

    return "\n".join(out) + "\n\n" + list_peer_cases()


def peer_selection(peer: str, ops: Optional[List[str]], models: Optional[List[str]],
                   known: List[str]) -> List[str]:
    """The peer cases ``--peer`` selects: 'auto' = all when --ops and --models select everything, else none;
    'all'; 'none'; or comma-separated names (UsageError for an unknown one)."""
    if peer.strip().lower() == "auto":
        return list(known) if ops is None and models is None else []
    names = split_list(peer)
    _check_names("peer case", names, known)
    return list(known) if names is None else names


def _check_names(kind: str, given, known) -> None:
    for name in given or []:
        if name not in known:
            raise UsageError(f"unknown {kind} {name!r}; known: {', '.join(known)}")


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(list_shapes())
        return 0
    import torch

    from perceiver_fast.bench import shapes as S
    from perceiver_fast.bench.runner import OP_GROUPS, BenchOptions, known_backends
    from perceiver_fast.runtime import check_output_dir, resolve_device

    ops = split_list(args.ops)
    _check_names("op case", ops, [s.name for s in S.ATTN_SHAPES] + list(OP_GROUPS))
    models = split_list(args.models)
    _check_names("model case", models, [c.name for c in S.MODEL_CASES])
    from perceiver_fast.bench.peer import peer_names

    peer = peer_selection(args.peer, ops, models, peer_names())
    old_rows = None
    if args.compare is not None:
        from perceiver_fast.bench.compare import load_rows

        if not args.threshold >= 0:
            raise UsageError(f"--threshold must be >= 0, got {args.threshold}")
        try:
            old_rows = load_rows(args.compare)
        except ValueError as e:
            raise UsageError(str(e)) from None
    backends = split_list(args.backends)
    _check_names("backend", backends, known_backends())
    try:
        device = resolve_device(args.device, name="--device")
        check_output_dir(args.out, name="--out")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # GPU name, free memory and synchronize follow the current device

    from perceiver_fast.bench.peer import format_peer_table
    from perceiver_fast.bench.report import format_table, targets_markdown, write_all
    from perceiver_fast.bench.runner import run as run_bench

    opts = BenchOptions(device=str(device), dtype=args.dtype, quick=args.quick, ops=ops, models=models, peer=peer,
                        backends=backends, backward=not args.no_backward, compile=args.compile,
                        budget_s=args.budget_s, progress=not args.no_progress)
    result = run_bench(opts)
    paths = write_all(result, args.out)
    print(format_table(result))
    peer_table = format_peer_table(result["rows"])
    if peer_table:
        print()
        print(peer_table)
        with open(paths["table"], "a") as fh:  # table.txt gets the peer table too
            fh.write("\n" + peer_table + "\n")
    print()
    print(targets_markdown(result))
    if result["env"]["fused_path"] != "triton":
        print(f"No GPU: the Triton kernels need a CUDA GPU. The 'fused' rows above timed the "
              f"{result['env']['fused_path']} path on {result['env']['device']}, at small sizes.")
    print(f"wrote {', '.join(paths[k] for k in sorted(paths))} ({result['env']['elapsed_s']} s)")
    if old_rows is not None:
        from perceiver_fast.bench.compare import compare

        lines, regressed = compare(old_rows, result["rows"], args.threshold)
        print()
        print(f"compared with {args.compare}:")
        print("\n".join(lines))
        return 1 if regressed else 0
    return 0
