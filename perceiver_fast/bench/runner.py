"""``perceiver-fast bench``: runs the op, sweep and model benchmarks and returns
rows of one schema (:data:`ROW_FIELDS`), which :mod:`.report` prints and writes.

Sections:

* ``ceiling``: a 1 GiB device-to-device copy and an 8192^3 matmul (GPU only);
* ``op``: every attention shape of :data:`.shapes.ATTN_SHAPES` (forward and
  forward+backward) and the Fourier encoder, for every backend;
* ``sweep``: cross-attention forward time and memory against input length M;
* ``layer``: our cross-attention layer against HF's PerceiverLayer (same weights);
* ``model``: images/s of our models against HF transformers / timm.

On a machine without CUDA everything runs on the CPU at small sizes
(``shape.small()``), and the ``fused`` rows time the ops' PyTorch fallback:
the Triton kernels need a GPU.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from perceiver_fast.ops.backend import attention_backend

from . import shapes as S
from .backends import (ATTN_BACKENDS, FOURIER_BACKENDS, SDPA_BACKENDS, attn_backend, attn_grad_leaves,
                       attn_inputs, attn_reference64, fourier_backend, fourier_inputs)
from .timing import bench_ms, free_bytes, is_cuda, peak_extra_mib, release, sync

ROW_FIELDS = [
    "section", "name", "label", "direction", "dtype", "backend", "status", "ms", "speedup_vs_eager",
    "speedup_vs_best_sdpa", "tflops", "gbs", "peak_mib", "images_per_s", "floor_ms", "flops", "bytes",
    "relerr", "B", "H", "N", "M", "Dqk", "Dv", "kv_row_stride", "reason",
]

# --ops names that select a group of cases rather than one attention shape
OP_GROUPS = ("fourier", "sweep", "layers")

# relative error (vs float64) above which a result is marked WRONG
TOLERANCE = {"bfloat16": 3e-2, "float16": 1e-2, "float32": 5e-3}


def make_row(**kw) -> Dict:
    row = {k: None for k in ROW_FIELDS}
    unknown = set(kw) - set(ROW_FIELDS)
    if unknown:
        raise KeyError(f"not in the row schema: {sorted(unknown)}")
    row.update(kw)
    return row


@dataclass
class BenchOptions:
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: Optional[str] = None  # default: bfloat16 on a GPU, float32 on a CPU
    quick: bool = False
    ops: Optional[List[str]] = None  # None = all; names of attention shapes, "fourier", "sweep"
    models: Optional[List[str]] = None  # None = all; [] = none
    backends: Optional[List[str]] = None  # None = all
    backward: bool = True
    # torch.compile baselines. None (default): for the Fourier encoder on a GPU (its target is stated against
    # torch.compile), not for attention (the anchors show compile of eager attention never clearly beating the best
    # SDPA backend, and compiling 16 graphs would take minutes of the run). True: both. False: none.
    compile: Optional[bool] = None
    budget_s: Optional[float] = None  # skip what is left after this many seconds
    progress: bool = True
    small: Optional[bool] = None  # default: small sizes on CPU
    compile_fourier: bool = field(default=False, init=False)
    compile_attention: bool = field(default=False, init=False)

    def resolved(self) -> "BenchOptions":
        o = dataclasses.replace(self)
        cuda = is_cuda(o.device)
        if o.dtype is None:
            o.dtype = "bfloat16" if cuda else "float32"
        o.compile_fourier = o.compile if o.compile is not None else cuda
        o.compile_attention = bool(o.compile)
        if o.small is None:
            o.small = not cuda
        return o


@dataclass
class Job:
    section: str
    label: str
    run: Callable[[], List[Dict]]
    weight: float = 1.0


# ----------------------------------------------------------------------------
# environment


def git_commit() -> Optional[str]:
    """HEAD of the checkout (with -dirty), or $PERCEIVER_FAST_COMMIT where there is no .git (a copied tree)."""
    if os.environ.get("PERCEIVER_FAST_COMMIT"):
        return os.environ["PERCEIVER_FAST_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def fused_path(device) -> str:
    """The attention backend the 'fused' rows time on ``device`` (see :mod:`perceiver_fast.ops.backend`)."""
    return attention_backend(device)


def environment(opts: BenchOptions) -> Dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton is a dependency
        triton_version = None
    cuda = is_cuda(opts.device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                             f"{os.cpu_count()} cores)",
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "fused_path": fused_path(opts.device),
        "dtype": opts.dtype,
        "quick": opts.quick,
        "small_sizes": opts.small,
        "argv": sys.argv,
        "ceilings_assumed": S.H200_CEILINGS,
    }


# ----------------------------------------------------------------------------
# helpers


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(e).__name__}: {first}"[:160]


def _relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double()
    denom = ref.norm().item()
    return float("nan") if denom == 0 else (out - ref).norm().item() / denom


def _shape_cols(shape: S.AttnShape) -> Dict:
    return dict(B=shape.B, H=shape.H, N=shape.N, M=shape.M, Dqk=shape.Dqk, Dv=shape.Dv,
                kv_row_stride=shape.kv_row_stride)


def _memory_guard(shape: S.AttnShape, backend: str, dtype: str, backward: bool, device) -> Optional[str]:
    """A reason to skip a backend that materialises the score matrix and would not fit."""
    if backend not in ("eager", "compile", "sdpa-math"):
        return None
    free = free_bytes(device)
    if free is None:
        return None
    need = shape.eager_extra_bytes(dtype, backward) * (1.5 if backend == "sdpa-math" else 1.0)
    if need > 0.8 * free:
        return f"skipped: needs ~{need / 2**30:.1f} GiB for the score matrix, {free / 2**30:.1f} GiB free"
    return None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# ----------------------------------------------------------------------------
# jobs


def _ceiling_jobs(opts: BenchOptions) -> List[Job]:
    dev = opts.device

    def copy():
        x = torch.empty(2**30, dtype=torch.uint8, device=dev)
        x.random_()
        y = torch.empty_like(x)
        ms = bench_ms(lambda: y.copy_(x), dev, opts.quick)
        del x, y
        release(dev)
        nbytes = 2 * 2**30
        return [make_row(section="ceiling", name="d2d-copy-1GiB", label="device copy 1 GiB (read+write)",
                         direction="fwd", dtype="uint8", backend="torch", status="ok", ms=ms, bytes=nbytes,
                         gbs=nbytes / ms / 1e6)]

    def matmul():
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        b = torch.randn_like(a)
        ms = bench_ms(lambda: a @ b, dev, opts.quick)
        del a, b
        release(dev)
        fl = 2 * 8192**3
        return [make_row(section="ceiling", name="matmul-8192", label="bf16 matmul 8192^3", direction="fwd",
                         dtype="bfloat16", backend="torch", status="ok", ms=ms, flops=fl, tflops=fl / ms / 1e9)]

    return [Job("ceiling", "ceiling: copy", copy), Job("ceiling", "ceiling: matmul", matmul)]


def _attn_case(shape: S.AttnShape, backend: str, opts: BenchOptions, section: str, backward: bool,
               name: Optional[str] = None) -> List[Dict]:
    dev, dt = opts.device, opts.dtype
    name = name or shape.name
    base = dict(section=section, name=name, label=shape.label(), dtype=dt, backend=backend, **_shape_cols(shape))
    rows = []
    directions = ["fwd", "fwd+bwd"] if backward else ["fwd"]
    try:
        fn = attn_backend(backend, shape)
    except Exception as e:
        return [make_row(direction=d, status="FAIL", reason=_reason(e), **base) for d in directions]
    inp = None
    try:
        for d in directions:
            bwd = d == "fwd+bwd"
            flops, nbytes = shape.flops(bwd), shape.bytes(dt, bwd)
            row = make_row(direction=d, flops=flops, bytes=nbytes, floor_ms=shape.floor_ms(dt, bwd), **base)
            rows.append(row)
            skip = _memory_guard(shape, backend, dt, bwd, dev)
            if skip:
                row.update(status="SKIP", reason=skip)
                continue
            try:
                if inp is None:
                    inp = attn_inputs(shape, dt, dev, requires_grad=backward)
                if not bwd:
                    with torch.no_grad():
                        out = fn(inp)
                        sync(dev)
                        ref = attn_reference64(inp, shape)
                        err = _relerr(out[:1], ref)
                        del out, ref
                        ms = bench_ms(lambda: fn(inp), dev, opts.quick)
                        mib = peak_extra_mib(lambda: fn(inp), dev)
                    row.update(relerr=err)
                    if not (err <= TOLERANCE.get(dt, 3e-2)):
                        row.update(status="WRONG", reason=f"relative error {err:.2e} vs float64 eager")
                else:
                    leaves = attn_grad_leaves(backend, inp)
                    d_out = inp["d_out"]

                    def fb():
                        out = fn(inp)
                        return torch.autograd.grad(out, leaves, d_out)

                    ms = bench_ms(fb, dev, opts.quick, backward=True)
                    mib = peak_extra_mib(fb, dev)
                row.update(ms=ms, peak_mib=mib, tflops=flops / ms / 1e9, gbs=nbytes / ms / 1e6)
                if row["status"] is None:
                    row["status"] = "ok"
            except Exception as e:  # a refused shape, a missing kernel, an OOM
                row.update(status="FAIL", reason=_reason(e))
                if _is_oom(e):
                    inp = None
                release(dev)
    finally:
        del inp
        release(dev)
    return rows


def _fourier_case(shape: S.FourierShape, backend: str, opts: BenchOptions) -> List[Dict]:
    dev = opts.device
    dt = "float32"  # the encoder's output is float32 (HF's recipe)
    nbytes = shape.bytes(dt)
    row = make_row(section="op", name=f"fourier-{shape.name}", label=shape.label(), direction="fwd", dtype=dt,
                   backend=backend, bytes=nbytes, flops=0, floor_ms=shape.floor_ms(dt), B=shape.B,
                   M=shape.points, Dv=shape.out_channels)
    try:
        fn = fourier_backend(backend, shape)
        inp = fourier_inputs(shape, dt, dev)
        with torch.no_grad():
            out = fn(inp)
            sync(dev)
            from perceiver_fast.ops.reference import fourier_encode_reference

            ref = fourier_encode_reference(inp["x"][:1].double(), shape.num_bands, concat_pos=shape.concat_pos,
                                           sine_only=shape.sine_only)
            err = _relerr(out[:1], ref)
            del out, ref
            ms = bench_ms(lambda: fn(inp), dev, opts.quick)
            mib = peak_extra_mib(lambda: fn(inp), dev)
        row.update(status="ok", ms=ms, gbs=nbytes / ms / 1e6, peak_mib=mib, relerr=err)
        if not (err <= 1e-4):
            row.update(status="WRONG", reason=f"relative error {err:.2e} vs float64 eager")
    except Exception as e:
        row.update(status="FAIL", reason=_reason(e))
    release(dev)
    return [row]


def _wanted(name: str, selected: Optional[List[str]]) -> bool:
    return selected is None or name in selected


def known_backends() -> List[str]:
    """Every name --backends accepts: the op backends, and the model/layer implementations in full
    (``hf:eager``) or by their prefix (``hf``)."""
    from .layers import LAYER_IMPLS
    from .models import PIO_IMPLS, VIT_IMPLS

    names = list(ATTN_BACKENDS) + [b for b in FOURIER_BACKENDS if b not in ATTN_BACKENDS]
    for impl in PIO_IMPLS + VIT_IMPLS + LAYER_IMPLS:
        for n in (impl, impl.split(":")[0]):
            if n not in names:
                names.append(n)
    return names


def _attn_backends(opts: BenchOptions, with_compile: bool) -> List[str]:
    out = []
    for b in ATTN_BACKENDS:
        if b == "compile" and not (opts.compile_attention and with_compile):
            continue
        if opts.backends is not None and b not in opts.backends:
            continue
        out.append(b)
    return out


def build_jobs(opts: BenchOptions) -> List[Job]:
    """Jobs in priority order (a --budget-s cut drops the tail): ceilings, ops, Fourier encoder, layers,
    models, then the sweep against M (whose largest sizes are the slowest cases)."""
    jobs: List[Job] = []
    cuda = is_cuda(opts.device)
    if cuda and _wanted("ceiling", opts.ops) and opts.ops is None:
        jobs += _ceiling_jobs(opts)
    attn = [s for s in S.ATTN_SHAPES if _wanted(s.name, opts.ops)]
    if opts.quick and opts.ops is None:
        attn = [s for s in attn if s.name in S.QUICK_ATTN]
    for shape in attn:
        sh = shape.small() if opts.small else shape
        for b in _attn_backends(opts, with_compile=True):
            jobs.append(Job("op", f"{sh.name} {b}",
                            (lambda sh=sh, b=b: _attn_case(sh, b, opts, "op", opts.backward)),
                            weight=2.0 if opts.backward else 1.0))
    if _wanted("fourier", opts.ops):
        for fs in S.FOURIER_SHAPES:
            fsh = fs.small() if opts.small else fs
            for b in FOURIER_BACKENDS:
                if (b == "compile" and not opts.compile_fourier) or (opts.backends is not None and b not in opts.backends):
                    continue
                jobs.append(Job("op", f"fourier {b}", lambda fsh=fsh, b=b: _fourier_case(fsh, b, opts)))
    if _wanted("layers", opts.ops):
        from .layers import layer_jobs

        jobs += layer_jobs(opts)
    if opts.models is None or opts.models:
        from .models import model_jobs

        jobs += model_jobs(opts)
    if _wanted("sweep", opts.ops):
        if opts.small:
            ms = S.SWEEP_M_CPU[:3] if opts.quick else S.SWEEP_M_CPU
            base = S.SWEEP_BASE.small()
        else:
            ms = S.SWEEP_M_QUICK if opts.quick else S.SWEEP_M
            base = S.SWEEP_BASE
        for sh in S.sweep_shapes(ms, base):
            for b in _attn_backends(opts, with_compile=False):
                jobs.append(Job("sweep", f"{sh.name} {b}",
                                lambda sh=sh, b=b: _attn_case(sh, b, opts, "sweep", False, name=sh.name)))
    return jobs


# ----------------------------------------------------------------------------
# speedups


def add_speedups(rows: List[Dict]) -> None:
    """speedup_vs_eager and speedup_vs_best_sdpa, within each (section, name, direction, dtype).

    For model rows the "eager" baseline is the backend named ``*:eager`` in that
    group (HF transformers / timm without fused attention) and the "SDPA" one is
    any backend containing ``sdpa`` (timm with fused_attn, i.e. SDPA)."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        if r["section"] in ("op", "sweep", "layer", "model"):
            groups.setdefault((r["section"], r["name"], r["direction"], r["dtype"]), []).append(r)
    for grp in groups.values():
        ok = [r for r in grp if r["status"] in ("ok", "WRONG") and r["ms"]]
        eager = [r["ms"] for r in ok if r["backend"] == "eager" or r["backend"].endswith(":eager")]
        sdpa = [r["ms"] for r in ok if "sdpa" in r["backend"]]
        for r in ok:
            if eager:
                r["speedup_vs_eager"] = eager[0] / r["ms"]
            if sdpa:
                r["speedup_vs_best_sdpa"] = min(sdpa) / r["ms"]


# ----------------------------------------------------------------------------


def run(opts: BenchOptions, log: Callable[[str], None] = print) -> Dict:
    """Run the benchmark; returns {"env": ..., "rows": [...]} (rows in ROW_FIELDS schema)."""
    opts = opts.resolved()
    env = environment(opts)
    if not is_cuda(opts.device):
        log("No CUDA GPU here: running the CPU paths on small sizes. The Triton kernels need a GPU; on this machine "
            f"the 'fused' rows time the ops' {env['fused_path']} path, not the GPU kernels.")
    jobs = build_jobs(opts)
    rows: List[Dict] = []
    t0 = time.time()
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="bench", unit="case", disable=not opts.progress, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        bar = None
    for job in jobs:
        if bar is not None:
            bar.set_postfix_str(job.label[:40])
        if opts.budget_s is not None and time.time() - t0 > opts.budget_s:
            rows.append(make_row(section=job.section, name=job.label, status="SKIP",
                                 reason=f"time budget of {opts.budget_s:.0f} s used up"))
        else:
            try:
                rows += job.run()
            except Exception as e:  # never lose the run to one case
                traceback.print_exc()
                rows.append(make_row(section=job.section, name=job.label, status="FAIL", reason=_reason(e)))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    add_speedups(rows)
    env["elapsed_s"] = round(time.time() - t0, 1)
    return {"env": env, "rows": rows}
