"""Op benchmarks: the device ceilings, every attention shape (forward, and forward+backward with
the gradients checked against float64), the Fourier encoder, and three sweeps of cross-attention:
time and memory against input length M, against head dim D, and the largest M that fits per backend.

Shapes with the kernels' features (grouped-query heads, causal, softcap; ``shapes.FEATURE_SHAPES``)
get their inputs and backends here (:func:`feature_inputs`, :func:`feature_backend`): K/V with Hkv
heads, every backend given the same flags, the eager baseline ``attention_reference`` with them too.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from perceiver_fast.ops.reference import attention_reference, fourier_encode_reference

from . import shapes as S
from .backends import (ATTN_BACKENDS, CUDA_ONLY_SDPA_BACKENDS, FOURIER_BACKENDS, SDPA_BACKENDS, attn_backend, attn_grad_leaves, attn_inputs,
                       attn_reference64, fourier_backend, fourier_inputs, torch_dtype)
from .schema import TOLERANCE, Job, Timed, failure_reason, make_row, relerr, time_rows
from .timing import free_bytes, is_cuda, is_oom, release, sync

# backends whose gradients are taken w.r.t. the package-layout leaves (SDPA's are its own (B, H, S, D) copies)
GRAD_CHECKED = ("eager", "compile", "fused", "fused-triton")
FIT_MAX_M_GPU = 2**23
FIT_MAX_M_CPU = 2**14


def feature_flags(shape: S.AttnShape) -> Dict:
    """The op keywords of a shape's features (causal, softcap)."""
    return dict(causal=shape.causal, softcap=shape.softcap)


def feature_inputs(shape: S.AttnShape, dtype: str, device, requires_grad: bool = False, seed: int = 0) -> Dict:
    """Random q (Bq, N, H, Dqk), k/v (B, M, Hkv, D), dO, and SDPA's (B, heads, S, D) copies, for a feature shape.

    The dict also holds the shape's ``flags`` (causal, softcap) for the float64 references."""
    dt = torch_dtype(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    hkv = shape.kv_heads
    q = torch.randn(shape.Bq, shape.N, shape.H, shape.Dqk, generator=gen, device=device, dtype=dt)
    k = torch.randn(shape.B, shape.M, hkv, shape.Dqk, generator=gen, device=device, dtype=dt)
    v = torch.randn(shape.B, shape.M, hkv, shape.Dv, generator=gen, device=device, dtype=dt)
    d_out = torch.randn(shape.B, shape.N, shape.H, shape.Dv, generator=gen, device=device, dtype=dt)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    sdpa = [t.detach().transpose(1, 2).contiguous().requires_grad_(requires_grad) for t in (q, k, v)]
    if shape.Bq != shape.B:
        sdpa[0] = sdpa[0].detach().expand(shape.B, -1, -1, -1).contiguous().requires_grad_(requires_grad)
    return {"q": q, "k": k, "v": v, "leaves": [q, k, v], "d_out": d_out, "sdpa": tuple(sdpa),
            "sdpa_leaves": list(sdpa), "flags": feature_flags(shape)}


def feature_backend(name: str, shape: S.AttnShape) -> Callable[[Dict], torch.Tensor]:
    """A callable inp -> output (B, N, H, Dv) for a feature shape, every backend given the shape's flags.

    SDPA takes grouped heads (``enable_gqa``) and causal masking when N == M (its top-left causal mask is
    our bottom-right one only then); it has no soft-capping. It raises otherwise (recorded as FAIL)."""
    flags = feature_flags(shape)
    if name == "eager":
        return lambda inp: attention_reference(inp["q"], inp["k"], inp["v"], **flags)
    if name == "compile":
        torch._dynamo.reset()
        fn = torch.compile(attention_reference, dynamic=False)
        return lambda inp: fn(inp["q"], inp["k"], inp["v"], **flags)
    if name in SDPA_BACKENDS:
        if shape.softcap > 0.0 or (shape.causal and shape.N != shape.M):
            raise RuntimeError(f"{name}: no soft-capping and no bottom-right causal mask for N != M "
                               f"({shape.label()})")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        which = [{"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                  "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}[name]]

        def run(inp):
            q, k, v = inp["sdpa"]
            with sdpa_kernel(which):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal,
                                                   enable_gqa=shape.kv_heads != shape.H)
            return o.transpose(1, 2)

        return run
    if name in ("fused", "fused-triton"):
        from perceiver_fast.ops import attention as attn_ops

        backend = "triton" if name == "fused-triton" else "auto"
        if shape.op == "cross":
            return lambda inp: attn_ops.cross_attention(inp["q"], inp["k"], inp["v"], backend=backend, **flags)
        return lambda inp: attn_ops.self_attention(inp["q"], inp["k"], inp["v"], backend=backend, **flags)
    return attn_backend(name, shape)  # raises the unknown-backend error


def reference64(inp: Dict, shape: S.AttnShape) -> torch.Tensor:
    """float64 eager output for batch element 0, with the shape's flags."""
    if not shape.has_features:
        return attn_reference64(inp, shape)
    q, k, v = (inp[n][:1].detach().double() for n in ("q", "k", "v"))
    return attention_reference(q, k, v, **inp["flags"])


def shape_cols(shape: S.AttnShape) -> Dict:
    return dict(B=shape.B, H=shape.H, N=shape.N, M=shape.M, Dqk=shape.Dqk, Dv=shape.Dv,
                kv_row_stride=shape.kv_row_stride)


def memory_guard(shape: S.AttnShape, backend: str, dtype: str, backward: bool, device) -> Optional[str]:
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


def grads_reference64(inp: Dict) -> List[Optional[torch.Tensor]]:
    """float64 gradients of the eager attention for batch element 0, w.r.t. the batch-0 slices of the leaves
    of ``inp`` (strided K/V views rebuilt): cheap at every shape, like the forward check. None for a
    batch-shared q, whose gradient sums over the whole batch."""
    leaves64, views = [], []
    for t, leaf in zip((inp["q"], inp["k"], inp["v"]), inp["leaves"]):
        leaf64 = leaf.detach()[:1].double().requires_grad_(True)
        shape = (1,) + tuple(t.shape[1:])
        views.append(leaf64 if t is leaf else leaf64.as_strided(shape, t.stride(), t.storage_offset()))
        leaves64.append(leaf64)
    out = attention_reference(*views, **inp.get("flags", {}))
    grads = torch.autograd.grad(out, leaves64, inp["d_out"][:1].double())
    shared_q = inp["q"].shape[0] == 1 and inp["k"].shape[0] > 1
    return [None if i == 0 and shared_q else g for i, g in enumerate(grads)]


def attn_case_rows(shape: S.AttnShape, backend: str, opts, section: str, backward: bool,
                   name: Optional[str] = None) -> List[Dict]:
    dev, dt = opts.device, opts.dtype
    base = dict(section=section, name=name or shape.name, label=shape.label(), dtype=dt, backend=backend,
                **shape_cols(shape))
    directions = ["fwd", "fwd+bwd"] if backward else ["fwd"]
    rows = [make_row(direction=d, flops=shape.flops(d != "fwd"), bytes=shape.bytes(dt, d != "fwd"),
                     floor_ms=shape.floor_ms(dt, d != "fwd"), **base) for d in directions]
    tol = TOLERANCE.get(dt, 3e-2)

    featured = shape.has_features
    make_inputs = feature_inputs if featured else attn_inputs

    def build() -> Timed:
        fn = (feature_backend if featured else attn_backend)(backend, shape)
        state: Dict = {}

        def inputs() -> Dict:
            if "inp" not in state:  # built on first use (a skipped case allocates nothing), with grad mode on:
                with torch.enable_grad():  # SDPA's transposed views must stay connected to the leaves
                    state["inp"] = make_inputs(shape, dt, dev, requires_grad=backward)
            return state["inp"]

        def fb():
            inp = inputs()
            return torch.autograd.grad(fn(inp), attn_grad_leaves(backend, inp), inp["d_out"])

        def check(direction: str) -> Dict:
            inp = inputs()
            if direction == "fwd":
                out = fn(inp)
                sync(dev)
                err = relerr(out[:1], reference64(inp, shape))
                bad = not err <= tol
                return dict(relerr=err, **(dict(status="WRONG", reason=f"relative error {err:.2e} vs float64 "
                                                                       f"eager") if bad else {}))
            if backend not in GRAD_CHECKED:
                return {}
            grads = fb()
            err = max(relerr(g[:1], r) for g, r in zip(grads, grads_reference64(inp)) if r is not None)
            bad = not err <= 2 * tol
            return dict(grad_relerr=err, **(dict(status="WRONG", reason=f"gradient relative error {err:.2e} vs "
                                                                        f"float64 eager") if bad else {}))

        return Timed(forward=lambda: fn(inputs()), forward_backward=fb, check=check,
                     skip=lambda d: memory_guard(shape, backend, dt, d != "fwd", dev), cleanup=[state.clear])

    return time_rows(rows, build, dev, opts.quick)


def fourier_case_rows(shape: S.FourierShape, backend: str, opts) -> List[Dict]:
    dev, dt = opts.device, "float32"  # the encoder's output is float32 (HF's recipe)
    nbytes = shape.bytes(dt)
    rows = [make_row(section="op", name=f"fourier-{shape.name}", label=shape.label(), direction="fwd", dtype=dt,
                     backend=backend, bytes=nbytes, flops=0, floor_ms=shape.floor_ms(dt), B=shape.B,
                     M=shape.points, Dv=shape.out_channels)]

    def build() -> Timed:
        fn = fourier_backend(backend, shape)
        inp = fourier_inputs(shape, dt, dev)

        def check(direction: str) -> Dict:
            out = fn(inp)
            sync(dev)
            ref = fourier_encode_reference(inp["x"][:1].double(), shape.num_bands, concat_pos=shape.concat_pos,
                                           sine_only=shape.sine_only)
            err = relerr(out[:1], ref)
            return dict(relerr=err, **({} if err <= 1e-4 else
                                       dict(status="WRONG", reason=f"relative error {err:.2e} vs float64 eager")))

        return Timed(forward=lambda: fn(inp), check=check)

    return time_rows(rows, build, dev, opts.quick)


def ceiling_jobs(opts) -> List[Job]:
    """A 1 GiB device-to-device copy and an 8192^3 bf16 matmul (GPU only): the measured ceilings."""
    dev = opts.device

    def copy() -> List[Dict]:
        rows = [make_row(section="ceiling", name="d2d-copy-1GiB", label="device copy 1 GiB (read+write)",
                         direction="fwd", dtype="uint8", backend="torch", bytes=2 * 2**30)]

        def build() -> Timed:
            x = torch.empty(2**30, dtype=torch.uint8, device=dev).random_()
            y = torch.empty_like(x)
            return Timed(forward=lambda: y.copy_(x))

        return time_rows(rows, build, dev, opts.quick)

    def matmul() -> List[Dict]:
        rows = [make_row(section="ceiling", name="matmul-8192", label="bf16 matmul 8192^3", direction="fwd",
                         dtype="bfloat16", backend="torch", flops=2 * 8192**3)]

        def build() -> Timed:
            a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
            b = torch.randn_like(a)
            return Timed(forward=lambda: a @ b)

        return time_rows(rows, build, dev, opts.quick)

    return [Job("ceiling", "ceiling: copy", copy), Job("ceiling", "ceiling: matmul", matmul)]


def largest_m_rows(backend: str, base: S.AttnShape, opts) -> List[Dict]:
    """The largest input length M (doubling from base.M) whose forward runs on this backend."""
    dev, dt = opts.device, opts.dtype
    limit = FIT_MAX_M_GPU if is_cuda(dev) else FIT_MAX_M_CPU
    fn = None
    best, why, m = None, f"stopped at the cap M = {limit}", base.M
    try:
        fn = attn_backend(backend, base)
    except Exception as e:
        why = failure_reason(e)
        m = limit + 1
    while m <= limit:
        shape = base.replace(name=f"fit-M{m}", M=m)
        guard = memory_guard(shape, backend, dt, False, dev)
        if guard:
            why = f"M = {m}: {guard}"
            break
        try:
            inp = attn_inputs(shape, dt, dev)
            with torch.no_grad():
                fn(inp)
                sync(dev)
            del inp
            best, m = m, 2 * m
        except Exception as e:
            why = f"M = {m}: {failure_reason(e)}" + (" (out of memory)" if is_oom(e) else "")
            break
        finally:
            release(dev)
    row = make_row(section="fit", name="largest-M", label=f"largest M that fits ({base.label()})", direction="fwd",
                   dtype=dt, backend=backend, status="ok" if best else "FAIL", reason=why,
                   **dict(shape_cols(base), M=best))
    return [row]


def attn_backends(opts, with_compile: bool, op: str = "cross") -> List[str]:
    """The backends a section runs; ``fused-triton`` only for self-attention on a GPU, the one place it
    differs from ``fused`` (which dispatches such calls to SDPA)."""
    out = []
    for b in ATTN_BACKENDS:
        if b == "fused-triton" and (op != "self" or not is_cuda(opts.device)):
            continue
        if b in CUDA_ONLY_SDPA_BACKENDS and not is_cuda(opts.device) and opts.backends is None:
            continue  # not "FAIL No viable backend" rows: these kernels do not exist on this device (asked for
            # by name, they still run and record the refusal)
        if b == "compile" and not (opts.compile_attention and with_compile):
            continue
        if opts.backends is not None and b not in opts.backends:
            continue
        out.append(b)
    return out


def wanted(name: str, selected: Optional[List[str]]) -> bool:
    return selected is None or name in selected


def op_jobs(opts) -> List[Job]:
    """Ceilings (GPU, full run), attention shapes, Fourier encoder."""
    jobs: List[Job] = []
    if is_cuda(opts.device) and opts.ops is None:
        jobs += ceiling_jobs(opts)
    attn = [s for s in S.ATTN_SHAPES + S.FEATURE_SHAPES if wanted(s.name, opts.ops)]
    if opts.quick and opts.ops is None:
        attn = [s for s in attn if s.name in S.QUICK_ATTN]
    for shape in attn:
        sh = shape.small() if opts.small else shape
        for b in attn_backends(opts, with_compile=True, op=sh.op):
            jobs.append(Job("op", f"{sh.name} {b}", (lambda sh=sh, b=b: attn_case_rows(sh, b, opts, "op", opts.backward)),
                            weight=2.0 if opts.backward else 1.0))
    if wanted("fourier", opts.ops):
        for fs in S.FOURIER_SHAPES:
            fsh = fs.small() if opts.small else fs
            for b in FOURIER_BACKENDS:
                if (b == "compile" and not opts.compile_fourier) or (opts.backends is not None and b not in opts.backends):
                    continue
                jobs.append(Job("op", f"fourier {b}", lambda fsh=fsh, b=b: fourier_case_rows(fsh, b, opts)))
    return jobs


def sweep_jobs(opts) -> List[Job]:
    """Cross-attention forward against M ('sweep'), against head dim ('headdim'), and the largest M ('fit')."""
    jobs: List[Job] = []
    base = S.SWEEP_BASE.small() if opts.small else S.SWEEP_BASE
    if wanted("sweep", opts.ops):
        if opts.small:
            ms = S.SWEEP_M_CPU[:3] if opts.quick else S.SWEEP_M_CPU
        else:
            ms = S.SWEEP_M_QUICK if opts.quick else S.SWEEP_M
        for sh in S.sweep_shapes(ms, base):
            for b in attn_backends(opts, with_compile=False):
                jobs.append(Job("sweep", f"{sh.name} {b}",
                                lambda sh=sh, b=b: attn_case_rows(sh, b, opts, "sweep", False, name=sh.name)))
    if wanted("headdim", opts.ops):
        ds = S.HEADDIM_D_QUICK if opts.quick else S.HEADDIM_D
        for sh in S.headdim_shapes(ds, S.HEADDIM_BASE.small() if opts.small else S.HEADDIM_BASE):
            for b in attn_backends(opts, with_compile=False):
                jobs.append(Job("headdim", f"{sh.name} {b}",
                                lambda sh=sh, b=b: attn_case_rows(sh, b, opts, "headdim", False, name=sh.name)))
    if wanted("fit", opts.ops) and not opts.quick:
        for b in attn_backends(opts, with_compile=False):
            jobs.append(Job("fit", f"largest M {b}", lambda b=b: largest_m_rows(b, base.replace(M=1024), opts),
                            weight=4.0))
    return jobs
