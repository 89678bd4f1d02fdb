"""Fused attention: latent-to-input cross-attention and latent self-attention.

Public functions (flash_attn_func layout, (batch, seq, heads, head_dim)):

* :func:`cross_attention` -- q (Bq, N, H, Dqk) with Bq in {1, B}, k (B, M, H, Dqk),
  v (B, M, H, Dv), optional key padding mask; returns (B, N, H, Dv).
* :func:`self_attention` -- q, k, v (B, N, H, D), D <= 256.

Both are thin wrappers around two torch.library custom ops,
``perceiver_fast::attention_fwd`` (returns out and the fp32 log-sum-exp) and
``perceiver_fast::attention_bwd`` (returns dq, dk, dv), with fake
implementations and registered autograd, so torch.compile traces them without
graph breaks.

Backends, chosen inside the ops:

* CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``: the Triton kernels
  of :mod:`perceiver_fast.ops.attention_kernels`;
* other CPU tensors: a chunked PyTorch fallback (:func:`attention_fwd_chunked`,
  :func:`attention_bwd_chunked`) whose memory is O(N * chunk), never N x M.

Private knobs (tests and benchmarks): ``_BACKEND`` ("triton", "torch" or None
for automatic), ``_NUM_SPLITS`` (split-KV count for cross-attention; 0 or None
chooses from the SM count and the shape) and ``_CHUNK`` (key chunk of the
PyTorch fallback).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["cross_attention", "self_attention"]

MAX_HEAD_DIM_CROSS = 4096
MAX_HEAD_DIM_SELF = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_BACKEND: Optional[str] = None
_NUM_SPLITS: Optional[int] = None
_CHUNK: int = 1024
# Tests set _POISON so that every buffer the ops allocate starts as NaN (an
# element a kernel forgets to write then fails the comparison).
_POISON: bool = False


def _empty(shape, *, device, dtype) -> Tensor:
    t = torch.empty(shape, device=device, dtype=dtype)
    if _POISON and t.is_floating_point():
        t.fill_(float("nan"))
    return t


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------
def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_common(op: str, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (batch, seq, heads, head_dim), got shape {_shape(t)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{op}: {name} {_shape(t)} has dtype {t.dtype}; supported are float16, bfloat16 and "
                            f"float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k and v must share a dtype, got q {_shape(q)} {q.dtype}, k {_shape(k)} {k.dtype}, "
                        f"v {_shape(v)} {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k and v must be on one device, got q {_shape(q)} on {q.device}, "
                         f"k {_shape(k)} on {k.device}, v {_shape(v)} on {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] > 0 and t.stride(-1) != 1 and t.numel() > 0:
            raise ValueError(
                f"{op}: {name} of shape {_shape(t)} has last-dim stride {t.stride(-1)}; the head dim must be "
                f"contiguous (stride 1); call .contiguous() or project into a layout with a contiguous head dim"
            )
    if not isinstance(dropout_p, (float, int)) or not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"{op}: dropout_p must be a float in [0, 1), got {dropout_p!r}")


def _check_cross(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float) -> None:
    op = "cross_attention"
    _check_common(op, q, k, v, dropout_p)
    B, M, H, Dqk = k.shape
    if v.shape[0] != B or v.shape[1] != M or v.shape[2] != H:
        raise ValueError(f"{op}: k {_shape(k)} and v {_shape(v)} must agree in batch, keys and heads")
    if q.shape[0] not in (1, B) or q.shape[2] != H or q.shape[3] != Dqk:
        raise ValueError(
            f"{op}: q {_shape(q)} must be (Bq, N, H, Dqk) with Bq in {{1, {B}}}, H={H} and Dqk={Dqk} "
            f"to match k {_shape(k)}"
        )
    for name, d in (("Dqk", Dqk), ("Dv", v.shape[3])):
        if d < 1 or d > MAX_HEAD_DIM_CROSS:
            raise ValueError(f"{op}: head dim {name}={d} (q {_shape(q)}, k {_shape(k)}, v {_shape(v)}) is outside "
                             f"the supported range [1, {MAX_HEAD_DIM_CROSS}]")
    if H < 1:
        raise ValueError(f"{op}: need at least one head, got k {_shape(k)}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = f"{_shape(mask)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"{op}: key_padding_mask must be a bool tensor (True = attend) of shape (B, M) = "
                            f"({B}, {M}) from k {_shape(k)}, got key_padding_mask {got}")
        if mask.shape != (B, M):
            raise ValueError(f"{op}: key_padding_mask has shape {_shape(mask)}, expected (B, M) = ({B}, {M}) from k {_shape(k)}")
        if mask.device != k.device:
            raise ValueError(f"{op}: key_padding_mask is on {mask.device} but k is on {k.device} "
                             f"(key_padding_mask {_shape(mask)}, k {_shape(k)})")


def _check_self(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> None:
    op = "self_attention"
    _check_common(op, q, k, v, dropout_p)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{op}: q {_shape(q)}, k {_shape(k)} and v {_shape(v)} must all be (B, N, H, D)")
    D = q.shape[3]
    if D < 1 or D > MAX_HEAD_DIM_SELF:
        raise ValueError(f"{op}: head dim D={D} of q {_shape(q)} is outside the supported range [1, {MAX_HEAD_DIM_SELF}]")


# ---------------------------------------------------------------------------
# Chunked PyTorch fallback (CPU without the Triton interpreter)
# ---------------------------------------------------------------------------
def _chunk_keep(seed: int, start: int, shape, dropout_p: float, device) -> Tensor:
    """Dropout keep-mask of one key chunk, reproducible from (seed, start)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + start) % (2**63 - 1))
    return (torch.rand(shape, generator=g) >= dropout_p).to(device)


def attention_fwd_chunked(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
                          seed: Optional[int] = None, dropout_p: float = 0.0,
                          scale: float = 1.0, chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Online-softmax attention over key chunks in PyTorch (fp32 math).

    Same contract as the forward custom op: returns out (B, N, H, Dv) in q's
    dtype and lse fp32 (B, H, N), +inf for rows with no attended key.
    """
    chunk = chunk or _CHUNK
    Bq, N, H, _ = q.shape
    B, M, _, Dv = v.shape
    qf = q.float().transpose(1, 2)  # (Bq, H, N, D)
    m_i = torch.full((B, H, N), float("-inf"), device=q.device)
    l_i = torch.zeros((B, H, N), device=q.device)
    acc = torch.zeros((B, H, N, Dv), device=q.device)
    for m0 in range(0, M, chunk):
        m1 = min(m0 + chunk, M)
        kc = k[:, m0:m1].float().transpose(1, 2)
        vc = v[:, m0:m1].float().transpose(1, 2)
        s = torch.matmul(qf, kc.transpose(-1, -2)) * scale  # (B, H, N, C)
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, m0:m1], float("-inf"))
        m_new = torch.maximum(m_i, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m_i - m_safe)
        p = torch.exp(s - m_safe[..., None])
        l_i = l_i * alpha + p.sum(-1)
        if dropout_p > 0.0:
            keep = _chunk_keep(seed, m0, p.shape, dropout_p, p.device)
            p = p * keep / (1.0 - dropout_p)
        acc = acc * alpha[..., None] + torch.matmul(p, vc)
        m_i = m_new
    empty = l_i == 0
    l_safe = torch.where(empty, torch.ones_like(l_i), l_i)
    out = (acc / l_safe[..., None]).transpose(1, 2).to(q.dtype).contiguous()
    lse = torch.where(empty, torch.full_like(l_i, float("inf")), m_i + torch.log(l_safe))
    return out, lse.contiguous()


def attention_bwd_chunked(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          mask: Optional[Tensor] = None, seed: Optional[int] = None,
                          dropout_p: float = 0.0, scale: float = 1.0,
                          chunk: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2 backward over key chunks in PyTorch, from the saved lse."""
    chunk = chunk or _CHUNK
    Bq, N, H, Dqk = q.shape
    B, M, _, Dv = v.shape
    qf = q.float().transpose(1, 2)
    dof = do.float().transpose(1, 2)  # (B, H, N, Dv)
    delta = (dof * out.float().transpose(1, 2)).sum(-1)  # (B, H, N)
    dq = torch.zeros((B, H, N, Dqk), device=q.device)
    dk = _empty(k.shape, device=k.device, dtype=k.dtype)
    dv = _empty(v.shape, device=v.device, dtype=v.dtype)
    for m0 in range(0, M, chunk):
        m1 = min(m0 + chunk, M)
        kc = k[:, m0:m1].float().transpose(1, 2)
        vc = v[:, m0:m1].float().transpose(1, 2)
        s = torch.matmul(qf, kc.transpose(-1, -2)) * scale
        p = torch.exp(s - lse[..., None])
        if mask is not None:
            p = p.masked_fill(~mask[:, None, None, m0:m1], 0.0)
        dp = torch.matmul(dof, vc.transpose(-1, -2))
        pz = p
        if dropout_p > 0.0:
            z = _chunk_keep(seed, m0, p.shape, dropout_p, p.device) / (1.0 - dropout_p)
            pz = p * z
            dp = dp * z
        ds = p * (dp - delta[..., None])
        dv[:, m0:m1] = torch.matmul(pz.transpose(-1, -2), dof).transpose(1, 2).to(v.dtype)
        dk[:, m0:m1] = (torch.matmul(ds.transpose(-1, -2), qf.expand(B, -1, -1, -1)) * scale).transpose(1, 2).to(k.dtype)
        dq += torch.matmul(ds, kc) * scale
    if Bq == 1:
        dq = dq.sum(0, keepdim=True)
    return dq.transpose(1, 2).to(q.dtype).contiguous(), dk, dv


# ---------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------
def _seed_int(seed: Optional[Tensor]) -> int:
    """The dropout seed the ops receive as a 1-element int64 tensor (None without dropout), as an int."""
    return int(seed.item()) if seed is not None else 0


def _use_triton(t: Tensor) -> bool:
    if _BACKEND is not None:
        if _BACKEND not in ("triton", "torch"):
            raise ValueError(f"perceiver_fast.ops.attention._BACKEND must be 'triton', 'torch' or None, got {_BACKEND!r}")
        return _BACKEND == "triton"
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.library.custom_op("perceiver_fast::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                  seed: Optional[Tensor], dropout_p: float, softmax_scale: float,
                  num_splits: int) -> Tuple[Tensor, Tensor]:
    """Forward: (out (B, N, H, Dv) in q's dtype, lse fp32 (B, H, N))."""
    if _use_triton(q):
        from perceiver_fast.ops.attention_kernels import attention_fwd_triton

        return attention_fwd_triton(q, k, v, key_padding_mask, seed, dropout_p, softmax_scale, num_splits)
    return attention_fwd_chunked(q, k, v, key_padding_mask, _seed_int(seed), dropout_p, softmax_scale)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, key_padding_mask, seed, dropout_p, softmax_scale, num_splits):
    B, N, H, Dv = k.shape[0], q.shape[1], q.shape[2], v.shape[3]
    return q.new_empty((B, N, H, Dv)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("perceiver_fast::attention_bwd", mutates_args=())
def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  key_padding_mask: Optional[Tensor], seed: Optional[Tensor], dropout_p: float,
                  softmax_scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward: (dq, dk, dv) with the shapes and dtypes of q, k, v (contiguous)."""
    if _use_triton(q):
        from perceiver_fast.ops.attention_kernels import attention_bwd_triton

        return attention_bwd_triton(grad_out, q, k, v, out, lse, key_padding_mask, seed, dropout_p, softmax_scale)
    return attention_bwd_chunked(grad_out, q, k, v, out, lse, key_padding_mask, _seed_int(seed), dropout_p,
                                 softmax_scale)


@attention_bwd.register_fake
def _attention_bwd_fake(grad_out, q, k, v, out, lse, key_padding_mask, seed, dropout_p, softmax_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, seed, dropout_p, softmax_scale, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
    ctx.dropout_p = dropout_p
    ctx.softmax_scale = softmax_scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, seed,
                               ctx.dropout_p, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
def _draw_seed(dropout_p: float) -> Optional[Tensor]:
    if dropout_p <= 0.0:
        return None
    # From torch's default CPU generator, so torch.manual_seed reproduces a run.
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def cross_attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                    dropout_p: float = 0.0, softmax_scale: Optional[float] = None) -> Tensor:
    """Latent-to-input cross-attention ``softmax(q k^T * scale) v``.

    Args:
        q: (Bq, N, H, Dqk) queries, Bq in {1, B}. Bq == 1 is a batch-shared
            latent array: it is not expanded and its gradient is summed over
            the batch.
        k: (B, M, H, Dqk) keys. v: (B, M, H, Dv) values. Any strides with a
            contiguous last dim (e.g. views of a packed kv projection).
        key_padding_mask: optional bool (B, M), True = attend. Queries with no
            attended key output zeros and get zero gradient.
        dropout_p: attention dropout probability in [0, 1); pass 0.0 in eval.
        softmax_scale: defaults to Dqk ** -0.5.

    Returns:
        (B, N, H, Dv) in the input dtype (fp32 accumulation).
    """
    _check_cross(q, k, v, key_padding_mask, dropout_p)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, _ = attention_fwd(q, k, v, key_padding_mask, _draw_seed(dropout_p), float(dropout_p), scale,
                           int(_NUM_SPLITS or 0))
    return out


def self_attention(q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0,
                   softmax_scale: Optional[float] = None) -> Tensor:
    """Multi-head self-attention over (B, N, H, D) tensors, D <= 256.

    q, k and v may be views of one packed (B, N, 3, H, D) projection
    (``qkv.unbind(2)``); they are used in place, without copies.
    dropout_p in [0, 1) (pass 0.0 in eval); softmax_scale defaults to D ** -0.5.
    Returns (B, N, H, D) in the input dtype.
    """
    _check_self(q, k, v, dropout_p)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, _ = attention_fwd(q, k, v, None, _draw_seed(dropout_p), float(dropout_p), scale, 1)
    return out
