"""sm_90 compile report of the attention kernels, made with the GPU machine's toolchain, no GPU needed.

For every attention shape of the bench (perceiver_fast/bench/shapes.py), forward and
backward, bf16, it compiles each config the autotuner would try (after its pruning) for
sm_90 with triton 3.6.0 and that triton's ptxas, and reads from the PTX, ``ptxas -v``
and the metadata:

* ``dot``: wgmma (``wgmma.mma_async``), mma.sync, or fma (no tensor-core instruction);
* ``kv_loads``: tma (``cp.async.bulk.tensor``), cp.async, or ld.global;
* ``regs``, ``spills`` (spill store + load bytes), ``smem`` (bytes of shared memory);
* ``wgmma_loop``: the wgmma instruction shapes in the kernel's main loop (the innermost PTX loop
  that holds wgmma; e.g. ``64x m64n32k16 + 4x m64n256k16``), ``warpgroups`` (num_warps / 4: each
  warpgroup executes every wgmma of the per-thread PTX), ``issued_tensor_flops`` (per loop
  iteration, all warpgroups: warpgroups x sum of 2*64*N*K);
* forward only: ``min_tensor_flops`` (one BLOCK_N x BLOCK_M key block of the program's value
  tile: 2*BLOCK_N*BLOCK_M*(Dqk + Dv tile), the real head dims) and ``tensor_issue_ratio``
  (issued / minimum; printed as ``issue=1.50x``). This is compile-time analysis, not a
  measurement: it assumes one key block per loop iteration. Above 1.0 means duplicated or padded
  tensor work, e.g. every warpgroup computing the whole S tile (``warpsPerCTA = [8, 1]`` on a
  64-row tile) and then only its own half of P.V gives 1.5x on D512. The backward kernels get
  the loop's wgmma shapes and issued FLOPs but no minimum (None). ``--check`` ignores these.

Usage::

    python benchmarks/sm90_report.py --json sm90.json [--shapes pio-learned,pio-conv] [--check]

triton 3.6.0 is installed into a side folder on first use (``pip install --target``,
about 640 MB; ``--toolchain DIR`` or $PERCEIVER_FAST_SM90_TOOLCHAIN picks it), and the
script re-runs itself with that triton first on its path. ``--check`` exits 1 unless
every cross-attention entry (pio-learned, pio-fourier, pio-conv) has dot wgmma, K/V by
TMA or cp.async, no spills and shared memory within sm_90's 232,448 bytes.

Besides each shape as the bench declares it (``variant`` "base"; the bench's feature
shapes, perceiver_fast/bench/shapes.py FEATURE_SHAPES, compile with their own GQA /
causal / softcap flags), the checked cross-attention shapes also compile the kernels'
feature variants (``VARIANTS``): "gqa" (two query heads per key/value head: the
dK/dV kernel's group loop), "causal" (block skipping and the diagonal mask) and
"softcap" (tanh capping in the forward and its derivative in the backward). They
are held to the same bar.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

TRITON_VERSION = "3.6.0"
DEFAULT_TOOLCHAIN = os.path.join(os.path.expanduser("~"), ".cache", "perceiver_fast", f"triton-{TRITON_VERSION}")
CHECKED_SHAPES = ("pio-learned", "pio-fourier", "pio-conv")
# Feature variants compiled on the checked shapes: (query heads per key/value head, causal, softcap).
VARIANTS = {"gqa": (2, False, False), "causal": (1, True, False), "softcap": (1, False, True)}
SMEM_LIMIT = 232_448
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_toolchain(folder: str) -> None:
    """Install triton==3.6.0 into ``folder`` (no deps) unless it is there."""
    if os.path.isdir(os.path.join(folder, "triton")):
        return
    os.makedirs(folder, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", folder,
                    f"triton=={TRITON_VERSION}"], check=True)


def _reexec_with_toolchain(args) -> int:
    folder = args.toolchain
    ensure_toolchain(folder)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([folder, ROOT, env.get("PYTHONPATH", "")])
    env["PERCEIVER_FAST_SM90_CHILD"] = "1"
    return subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env).returncode


# ---------------------------------------------------------------------------
# In the child: compile and read
# ---------------------------------------------------------------------------
def _compile(kernel, args: dict, consts: dict, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    full = {**args, **consts}
    ordered = [full[n] for n in fn.arg_names]
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*ordered, num_warps=num_warps, num_stages=num_stages)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, {"num_warps": num_warps, "num_stages": num_stages}, bound, spec, opts)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _ptxas(ptx: str):
    from triton.backends.nvidia import compiler as nv

    import inspect

    get = nv.get_ptxas
    ptxas = (get(90) if "arch" in str(inspect.signature(get)) else get()).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        p = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", src, "-o", src + ".o"], capture_output=True, text=True)
    log = p.stdout + p.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else None,
            int(spill.group(1)) + int(spill.group(2)) if spill else None,
            os.path.basename(ptxas), log)


def _ptxas_version() -> str:
    from triton.backends.nvidia import compiler as nv

    import inspect

    get = nv.get_ptxas
    ptxas = (get(90) if "arch" in str(inspect.signature(get)) else get()).path
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else out.strip()[-40:]


def classify(ptx: str) -> tuple:
    """(dot, kv_loads) from a kernel's PTX."""
    dot = "wgmma" if "wgmma.mma_async" in ptx and "mma.sync" not in ptx else \
        "mma.sync" if "mma.sync" in ptx else "fma"
    if "cp.async.bulk.tensor" in ptx:
        loads = "tma"
    elif re.search(r"cp\.async\.c[ag]", ptx):
        loads = "cp.async"
    else:
        loads = "ld.global"
    return dot, loads


WGMMA_RE = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m(\d+)n(\d+)k(\d+)")
_LABEL_RE = re.compile(r"^\s*(\$L__\w+):")
_BRA_RE = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+)\s*;")


def main_loop_wgmma(ptx: str) -> dict:
    """{(m, n, k): count} of the wgmma instructions in the kernel's main loop: the innermost PTX loop
    (a label and a later branch back to it) holding wgmma, the one with the most tensor work if there
    are several (e.g. a causal kernel's off-diagonal and diagonal loops). With no such loop, every
    wgmma in the PTX."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = _LABEL_RE.match(line)
        if m:
            labels[m.group(1)] = i
    wg = [(i, tuple(int(x) for x in m.groups())) for i, line in enumerate(lines) for m in [WGMMA_RE.search(line)] if m]
    loops = []
    for i, line in enumerate(lines):
        m = _BRA_RE.search(line)
        if m and labels.get(m.group(1), i) < i:
            loops.append((labels[m.group(1)], i))
    loops = [r for r in loops if any(r[0] <= w <= r[1] for w, _ in wg)]
    inner = [r for r in loops if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in loops)]

    def counts(lo, hi):
        out = {}
        for w, shape in wg:
            if lo <= w <= hi:
                out[shape] = out.get(shape, 0) + 1
        return out

    if not inner:
        return counts(0, len(lines))
    return max((counts(lo, hi) for lo, hi in inner),
               key=lambda c: sum(n * 2 * m * nn * k for (m, nn, k), n in c.items()))


def tensor_issue(ptx: str, num_warps: int, min_flops=None) -> dict:
    """The tensor-work columns of one entry: ``wgmma_loop``, ``warpgroups``, ``issued_tensor_flops`` per
    main-loop iteration (every warpgroup executes every wgmma of the PTX), and, given the minimum for
    one iteration, ``min_tensor_flops`` and ``tensor_issue_ratio``."""
    c = main_loop_wgmma(ptx)
    wgs = max(1, num_warps // 4)
    issued = wgs * sum(n * 2 * m * nn * k for (m, nn, k), n in c.items())
    desc = " + ".join(f"{n}x m{m}n{nn}k{k}" for (m, nn, k), n in sorted(c.items(), key=lambda kv: kv[0][1]))
    return dict(wgmma_loop=desc or None, warpgroups=wgs, issued_tensor_flops=issued or None,
                min_tensor_flops=min_flops,
                tensor_issue_ratio=round(issued / min_flops, 3) if (issued and min_flops) else None)


def fwd_min_tensor_flops(block_n: int, block_m: int, dqk: int, dv: int, dv_tile: int) -> int:
    """The forward's minimum tensor FLOPs for one BLOCK_N x BLOCK_M key block of one program: S = Q K^T
    over Dqk and P V over the program's value tile (the real head dims, no padding)."""
    return 2 * block_n * block_m * (dqk + min(dv, dv_tile))


def _cfg_name(cfg) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" warps={cfg.num_warps} stages={cfg.num_stages}"


def _strides(B, S, H, D, row=None):
    row = row or H * D
    return S * row, row, D


def shape_variants(shape):
    """(variant name, query heads, key/value heads, causal, softcap) to compile for one bench shape: the shape
    as declared, plus the feature variants on the checked cross-attention shapes (the "gqa" variant gives
    each of the shape's H heads ``group`` query heads)."""
    out = [("base", shape.H, shape.kv_heads, shape.causal, shape.softcap > 0)]
    if shape.name in CHECKED_SHAPES:
        out += [(name, shape.H * group, shape.H, causal, softcap)
                for name, (group, causal, softcap) in VARIANTS.items()]
    return out


def _entries_for(shape, AT, torch, MockTensor, H=None, Hkv=None, causal=False, softcap=False):
    """(kernel name, direction, kernel, args, consts, configs) for one bench shape and feature variant
    (H query heads over Hkv key/value heads; default: the shape's)."""
    import triton

    dt = torch.bfloat16
    dev = torch.device("cpu")
    B, N, M, Dqk, Dv = shape.B, shape.N, shape.M, shape.Dqk, shape.Dv
    H = H or shape.H
    Hkv = Hkv or H
    group = H // Hkv
    # The op hands the kernels 16-byte aligned K/V: our layers' padded layout, or its repack of a
    # user's unaligned rows (plan_alignment), so every shape compiles with USE_TMA.
    pad = lambda d: triton.cdiv(d, 8) * 8  # noqa: E731
    qs = _strides(B, N, H, pad(Dqk))
    ks = _strides(B, M, Hkv, pad(Dqk))
    vs = _strides(B, M, Hkv, pad(Dv))
    os_ = _strides(B, N, H, triton.cdiv(Dv, 16) * 16)  # the launcher's padded output rows
    plan = AT.forward_plan(N, M, Dqk, Dv, dt, B, H, 0, dev)
    split = plan["num_splits"] > 1
    qk, vp = plan["qk"], plan["v"]
    fwd_args = dict(
        Q=MockTensor(dt), K=MockTensor(dt), V=MockTensor(dt), Mask=MockTensor(dt),
        Out=MockTensor(torch.float32 if split else dt), Lse=MockTensor(torch.float32), seed=0,
        stride_qb=qs[0] if shape.Bq > 1 else 0, stride_qn=qs[1], stride_qh=qs[2],
        stride_kb=ks[0], stride_km=ks[1], stride_kh=ks[2], stride_vb=vs[0], stride_vm=vs[1], stride_vh=vs[2],
        stride_maskb=0, stride_os=os_[0] * B if split else 0, stride_ob=os_[0], stride_on=os_[1],
        stride_oh=os_[2], stride_ls=B * H * N if split else 0,
        H=H, N=N, M=M, Dqk=Dqk, Dv=Dv, group=group, keys_per_split=plan["keys_per_split"], scale_log2=0.1,
        cap_in=0.1, cap_log2=0.1, dropout_p=0.0, key_offset=0, total_keys=M,
        N_BUCKET=AT.bucket(N), M_BUCKET=AT.bucket(M))
    fwd_consts = dict(HAS_MASK=False, DROPOUT=False, SPLIT=split, PRECISION="ieee", USE_TMA=True,
                      CAUSAL=causal, SOFTCAP=softcap,
                      QK_RESIDENT=qk.resident, DQK0=qk.main, DQK1=qk.tail, DV0=vp.main, DV1=vp.tail,
                      BLOCK_N=plan["block_n"])
    kernel = AT.attn_fwd_kernel
    fwd_cfgs = AT.prune_fwd_configs(kernel.configs, {"Q": MockTensor(dt)}, **fwd_consts)
    yield "attn_fwd", "fwd", kernel, fwd_args, fwd_consts, fwd_cfgs

    bwd_common = dict(
        Q=MockTensor(dt), K=MockTensor(dt), V=MockTensor(dt), Mask=MockTensor(dt), DO=MockTensor(dt),
        Lse=MockTensor(torch.float32), Delta=MockTensor(torch.float32), seed=0,
        stride_qb=qs[0] if shape.Bq > 1 else 0, stride_qn=qs[1], stride_qh=qs[2],
        stride_kb=ks[0], stride_km=ks[1], stride_kh=ks[2], stride_vb=vs[0], stride_vm=vs[1], stride_vh=vs[2],
        stride_maskb=0, stride_dob=_strides(B, N, H, pad(Dv))[0], stride_don=_strides(B, N, H, pad(Dv))[1],
        stride_doh=_strides(B, N, H, pad(Dv))[2],
        H=H, N=N, M=M, Dqk=Dqk, Dv=Dv, group=group, scale=0.1, scale_log2=0.1, cap_in=0.1, cap_log2=0.1,
        dropout_p=0.0, key_offset=0, total_keys=M,
        N_BUCKET=AT.bucket(N), M_BUCKET=AT.bucket(M), DQK_BUCKET=AT.bucket(Dqk), DV_BUCKET=AT.bucket(Dv))
    bwd_consts = dict(HAS_MASK=False, DROPOUT=False, PRECISION="ieee", USE_TMA=True, CAUSAL=causal, SOFTCAP=softcap)
    dkdv = dict(bwd_common, DK=MockTensor(dt), DV=MockTensor(dt), stride_dkb=ks[0], stride_dkm=ks[1],
                stride_dkh=ks[2], stride_dvb=vs[0], stride_dvm=vs[1], stride_dvh=vs[2])
    dq = dict(bwd_common, DQ=MockTensor(torch.float32), stride_dqs=B * N * H * Dqk, stride_dqb=N * H * Dqk,
              stride_dqn=H * Dqk, stride_dqh=Dqk, keys_per_split=plan["keys_per_split"])
    for name, kern, args, consts in (("attn_bwd_dkdv", AT.attn_bwd_dkdv_kernel, dkdv, dict(bwd_consts, GQA=group > 1)),
                                     ("attn_bwd_dq", AT.attn_bwd_dq_kernel, dq, bwd_consts)):
        cfgs = AT.prune_bwd_configs(kern.configs, args)
        yield name, "bwd", kern, args, consts, cfgs


def run_report(shape_names) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton
    from triton.runtime.jit import MockTensor

    from perceiver_fast.bench.shapes import ATTN_SHAPES, FEATURE_SHAPES
    from perceiver_fast.ops import attention_triton as AT

    shapes = [s for s in ATTN_SHAPES + FEATURE_SHAPES if shape_names is None or s.name in shape_names]
    entries = []
    for shape, (variant, H, Hkv, causal, softcap) in [(s, v) for s in shapes for v in shape_variants(s)]:
        for kname, direction, kernel, args, consts, cfgs in _entries_for(shape, AT, torch, MockTensor, H, Hkv,
                                                                         causal, softcap):
            for cfg in cfgs:
                entry = dict(kernel=kname, shape=shape.name, variant=variant, direction=direction,
                             config=_cfg_name(cfg))
                t0 = time.time()
                try:
                    c = _compile(kernel, args, {**consts, **cfg.kwargs}, cfg.num_warps, cfg.num_stages)
                    ptx = c.asm["ptx"]
                    dot, loads = classify(ptx)
                    regs, spills, _, _ = _ptxas(ptx)
                    entry.update(dot=dot, kv_loads=loads, regs=regs, spills=spills, smem=int(c.metadata.shared))
                    min_flops = None
                    if direction == "fwd" and "BLOCK_M" in cfg.kwargs:
                        min_flops = fwd_min_tensor_flops(consts["BLOCK_N"], cfg.kwargs["BLOCK_M"], shape.Dqk,
                                                         shape.Dv, consts["DV0"] + consts["DV1"])
                    entry.update(tensor_issue(ptx, cfg.num_warps, min_flops))
                except Exception as e:  # a config that does not compile is a finding, not a crash
                    entry.update(dot=None, kv_loads=None, regs=None, spills=None, smem=None, wgmma_loop=None,
                                 warpgroups=None, issued_tensor_flops=None, min_tensor_flops=None,
                                 tensor_issue_ratio=None,
                                 error=f"{type(e).__name__}: {str(e)[-300:]}")
                entry["compile_s"] = round(time.time() - t0, 1)
                print(f"{entry['shape']:>12} {variant:>7} {kname:>14} {entry['config']:<48} {entry.get('dot')} {entry.get('kv_loads')} "
                      f"regs={entry.get('regs')} spills={entry.get('spills')} smem={entry.get('smem')} "
                      f"{_issue_text(entry)} "
                      f"{entry.get('error', '')[:200]}", flush=True)
                entries.append(entry)
    return {"toolchain": {"triton": triton.__version__, "ptxas": _ptxas_version()}, "entries": entries}


def _issue_text(entry: dict) -> str:
    r = entry.get("tensor_issue_ratio")
    return f"issue={r:.2f}x" if r is not None else "issue=-"


def issue_summary(report: dict) -> list:
    """Lines of the forward entries' issued / minimum tensor FLOPs (compile-time analysis, not measured)."""
    out = []
    for e in report["entries"]:
        if e["direction"] == "fwd" and e.get("tensor_issue_ratio") is not None:
            out.append(f"  {e['shape']:>16} {e['variant']:>7} {e['config']:<36} {e['wgmma_loop']:<32} "
                       f"x{e['warpgroups']} wg  issued/min = {e['tensor_issue_ratio']:.2f}x")
    return out


def failures(report: dict) -> list:
    """Entries of the checked cross-attention shapes that miss wgmma / async K/V / no spills / smem."""
    bad = []
    for e in report["entries"]:
        if e["shape"] not in CHECKED_SHAPES:
            continue
        ok = (e.get("dot") == "wgmma" and e.get("kv_loads") in ("tma", "cp.async") and e.get("spills") == 0
              and e.get("smem") is not None and e["smem"] <= SMEM_LIMIT)
        if not ok:
            bad.append(e)
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the report")
    p.add_argument("--shapes", default=None, help="comma-separated bench shape names (default: all)")
    p.add_argument("--toolchain", default=os.environ.get("PERCEIVER_FAST_SM90_TOOLCHAIN", DEFAULT_TOOLCHAIN),
                   help="folder holding triton==3.6.0 (installed there if missing)")
    p.add_argument("--check", action="store_true", help="exit 1 if a checked cross-attention entry misses the bar")
    args = p.parse_args(argv)
    if os.environ.get("PERCEIVER_FAST_SM90_CHILD") != "1":
        return _reexec_with_toolchain(args)
    import triton

    if triton.__version__ != TRITON_VERSION:
        print(f"sm90_report: expected triton {TRITON_VERSION} from {args.toolchain}, got {triton.__version__}",
              file=sys.stderr)
        return 2
    names = set(args.shapes.split(",")) if args.shapes else None
    report = run_report(names)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    summary = issue_summary(report)
    if summary:
        print("forward: issued tensor FLOPs / minimum per key block (wgmma shapes of the PTX main loop; "
              "compile-time analysis, not measured)")
        print("\n".join(summary))
    bad = failures(report)
    print(f"sm90_report: {len(report['entries'])} entries, {len(bad)} below the bar on {', '.join(CHECKED_SHAPES)}")
    for e in bad:
        print("  " + json.dumps(e))
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
