"""Implementations compared by the benchmark, and the inputs they run on.

Each backend is a callable taking the tensors built by :func:`attn_inputs`
(or :func:`fourier_inputs`) and returning the output in the package layout
(B, N, H, Dv) for attention, so that every output can be checked against the
same float64 reference.

* ``eager``: :func:`perceiver_fast.ops.reference.attention_reference`
  (matmul, softmax, matmul, all in the input dtype) / ``fourier_encode_reference``;
* ``compile``: ``torch.compile`` of the same eager function;
* ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``:
  ``F.scaled_dot_product_attention`` pinned to one backend with
  ``torch.nn.attention.sdpa_kernel``; a backend that refuses the shape raises,
  and the runner records FAIL with the reason;
* ``fused``: this package's ops as a user calls them (``backend="auto"``: a
  self-attention call SDPA's fused kernels take goes to them);
* ``fused-triton``: the same ops forced onto our Triton kernels
  (``backend="triton"``), so our self-attention kernel stays measured beside
  the dispatch (GPU only; the op section runs it for self-attention shapes).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from perceiver_fast.ops.reference import attention_reference, fourier_encode_reference

from .shapes import AttnShape, FourierShape

SDPA_BACKENDS = ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"]
# SDPA kernels that exist for CUDA tensors only; the bench leaves them out elsewhere.
CUDA_ONLY_SDPA_BACKENDS = ["sdpa-efficient", "sdpa-cudnn"]
ATTN_BACKENDS = ["eager", "compile"] + SDPA_BACKENDS + ["fused", "fused-triton"]
FOURIER_BACKENDS = ["eager", "compile", "fused"]


def _sdpa_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-math": SDPBackend.MATH,
    }[name]


def torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}[name]


def _kv(shape: AttnShape, d: int, dtype, device, gen, requires_grad: bool):
    """K or V (B, M, H, d); a strided view into a wider buffer when kv_row_stride is set.

    Returns (tensor, leaf) where leaf is what requires grad."""
    B, M, H = shape.B, shape.M, shape.H
    stride = shape.kv_row_stride
    if stride is None or stride == H * d:
        t = torch.randn(B, M, H, d, generator=gen, device=device, dtype=dtype).requires_grad_(requires_grad)
        return t, t
    if stride < H * d:
        raise ValueError(f"{shape.name}: kv_row_stride {stride} < H*D = {H * d}")
    buf = torch.randn(B, M, stride, generator=gen, device=device, dtype=dtype).requires_grad_(requires_grad)
    view = buf.as_strided((B, M, H, d), (M * stride, stride, d, 1))
    return view, buf


def attn_inputs(shape: AttnShape, dtype: str, device, requires_grad: bool = False, seed: int = 0) -> Dict:
    """Random normal q, k, v (and dO) for ``shape``, plus SDPA's (B, H, N, D) copies.

    SDPA gets contiguous (B, H, S, D) tensors (converted outside the timed
    region) except for padded-stride shapes, where it gets the same strided
    view ("inputs as given")."""
    dt = torch_dtype(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(shape.Bq, shape.N, shape.H, shape.Dqk, generator=gen, device=device, dtype=dt)
    q.requires_grad_(requires_grad)
    k, k_leaf = _kv(shape, shape.Dqk, dt, device, gen, requires_grad)
    v, v_leaf = _kv(shape, shape.Dv, dt, device, gen, requires_grad)
    if shape.op == "self":
        assert shape.N == shape.M and shape.Bq == shape.B, shape
    d_out = torch.randn(shape.B, shape.N, shape.H, shape.Dv, generator=gen, device=device, dtype=dt)

    def bhsd(t, leaf):
        if shape.kv_row_stride is not None or shape.H == 1:
            return t.transpose(1, 2), leaf
        c = t.detach().transpose(1, 2).contiguous().requires_grad_(requires_grad)
        return c, c

    qs, qs_leaf = bhsd(q, q)
    if shape.Bq != shape.B:
        qs = qs.expand(shape.B, -1, -1, -1)
    ks, ks_leaf = bhsd(k, k_leaf)
    vs, vs_leaf = bhsd(v, v_leaf)
    return {
        "q": q, "k": k, "v": v, "leaves": [q, k_leaf, v_leaf], "d_out": d_out,
        "sdpa": (qs, ks, vs), "sdpa_leaves": [qs_leaf, ks_leaf, vs_leaf],
    }


def attn_reference64(inp: Dict, shape: AttnShape) -> torch.Tensor:
    """float64 eager output for batch element 0 (cheap at every shape)."""
    q = inp["q"][:1].detach().double()
    k = inp["k"][:1].detach().double()
    v = inp["v"][:1].detach().double()
    return attention_reference(q, k, v)


def attn_backend(name: str, shape: AttnShape) -> Callable[[Dict], torch.Tensor]:
    """A callable inp -> output (B, N, H, Dv). Raises ImportError/RuntimeError if unavailable."""
    if name == "eager":
        return lambda inp: attention_reference(inp["q"], inp["k"], inp["v"])
    if name == "compile":
        torch._dynamo.reset()  # one compiled graph per shape; never hit the recompile limit
        fn = torch.compile(attention_reference, dynamic=False)
        return lambda inp: fn(inp["q"], inp["k"], inp["v"])
    if name in SDPA_BACKENDS:
        from torch.nn.attention import sdpa_kernel

        which = [_sdpa_enum(name)]

        def run(inp):
            q, k, v = inp["sdpa"]
            with sdpa_kernel(which):
                o = F.scaled_dot_product_attention(q, k, v)
            return o.transpose(1, 2)

        return run
    if name in ("fused", "fused-triton"):
        from perceiver_fast.ops import attention as ops

        backend = "triton" if name == "fused-triton" else "auto"
        if shape.op == "cross":
            return lambda inp: ops.cross_attention(inp["q"], inp["k"], inp["v"], backend=backend)
        return lambda inp: ops.self_attention(inp["q"], inp["k"], inp["v"], backend=backend)
    raise KeyError(f"unknown attention backend {name!r}; known: {', '.join(ATTN_BACKENDS)}")


def attn_grad_leaves(name: str, inp: Dict) -> List[torch.Tensor]:
    return inp["sdpa_leaves"] if name in SDPA_BACKENDS else inp["leaves"]


def fourier_inputs(shape: FourierShape, dtype: str, device, seed: int = 0) -> Dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape.B, *shape.index_dims, shape.cin, generator=gen, device=device, dtype=torch_dtype(dtype))
    return {"x": x}


def fourier_backend(name: str, shape: FourierShape) -> Callable[[Dict], torch.Tensor]:
    kw = dict(concat_pos=shape.concat_pos, sine_only=shape.sine_only)
    nb = shape.num_bands
    if name == "eager":
        return lambda inp: fourier_encode_reference(inp["x"], nb, **kw)
    if name == "compile":
        torch._dynamo.reset()
        fn = torch.compile(fourier_encode_reference, dynamic=False)
        return lambda inp: fn(inp["x"], nb, **kw)
    if name == "fused":
        from perceiver_fast.ops.fourier import fourier_encode

        return lambda inp: fourier_encode(inp["x"], nb, **kw)
    raise KeyError(f"unknown fourier backend {name!r}; known: {', '.join(FOURIER_BACKENDS)}")
