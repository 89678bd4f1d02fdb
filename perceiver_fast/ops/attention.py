"""Fused attention: latent-to-input cross-attention and latent self-attention.

Public functions (flash_attn_func layout, (batch, seq, heads, head_dim)):

* :func:`cross_attention` -- q (Bq, N, H, Dqk) with Bq in {1, B}, k (B, M, H, Dqk),
  v (B, M, H, Dv), optional key padding mask; returns (B, N, H, Dv).
* :func:`self_attention` -- q, k, v (B, N, H, D).

Both are thin wrappers around two torch.library custom ops,
``perceiver_fast::attention_fwd`` (returns out and the fp32 log-sum-exp) and
``perceiver_fast::attention_bwd`` (returns dq, dk, dv), with fake
implementations and registered autograd, so torch.compile traces them without
graph breaks. The split-KV count and the backend are arguments of the ops.

This module holds the checks, the ops and the public functions; the kernels
live in :mod:`.attention_triton`, the PyTorch path in :mod:`.attention_cpu`,
and the choice between them in :mod:`.backend`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from perceiver_fast.ops.attention_cpu import attention_bwd_cpu, attention_fwd_cpu
from perceiver_fast.ops.backend import resolve_backend, seed_to_int

__all__ = ["check_key_range", "cross_attention", "draw_dropout_seed", "self_attention"]

MAX_HEAD_DIM = 4096
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
        if t.dtype not in SUPPORTED_DTYPES:
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
    B, M, Hkv, Dqk = k.shape
    if v.shape[0] != B or v.shape[1] != M or v.shape[2] != Hkv:
        raise ValueError(f"{op}: k {_shape(k)} and v {_shape(v)} must agree in batch, keys and heads")
    H = q.shape[2]
    if q.shape[0] not in (1, B) or q.shape[3] != Dqk or Hkv < 1 or H % Hkv != 0:
        raise ValueError(
            f"{op}: q {_shape(q)} must be (Bq, N, H, Dqk) with Bq in {{1, {B}}}, Dqk={Dqk} and H a multiple of "
            f"the {Hkv} key/value heads of k {_shape(k)}"
        )
    for name, d in (("Dqk", Dqk), ("Dv", v.shape[3])):
        if d < 1 or d > MAX_HEAD_DIM:
            raise ValueError(f"{op}: head dim {name}={d} (q {_shape(q)}, k {_shape(k)}, v {_shape(v)}) is outside "
                             f"the supported range [1, {MAX_HEAD_DIM}]")
    if H < 1:
        raise ValueError(f"{op}: need at least one head, got q {_shape(q)}")
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
    Hkv = k.shape[2]
    if not (k.shape == v.shape and q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3]
            and Hkv >= 1 and q.shape[2] % Hkv == 0):
        raise ValueError(f"{op}: q {_shape(q)} must be (B, N, H, D) and k {_shape(k)}, v {_shape(v)} both "
                         f"(B, N, Hkv, D) with Hkv dividing H")
    D = q.shape[3]
    if D < 1 or D > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim D={D} of q {_shape(q)} is outside the supported range [1, {MAX_HEAD_DIM}]")


# ---------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------
def check_op_args(op: str, q: Tensor, k: Tensor, softcap: float, softmax_scale: float) -> None:
    """What the ops themselves check (their callers may be other code than the public functions): grouped heads,
    softcap and the scale; errors name the argument and the shapes."""
    if k.dim() != 4 or q.dim() != 4 or k.shape[2] < 1 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"{op}: q {_shape(q)} must have a multiple of the key/value heads of k {_shape(k)} "
                         f"(both (batch, seq, heads, head_dim))")
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"{op}: softcap must be a finite float >= 0 (0 = no capping), got {softcap!r}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"{op}: softmax_scale must be finite, got {softmax_scale!r}")


def check_key_range(op: str, key_offset: int, total_keys: int, m: int) -> None:
    """Validate the ops' ``key_offset`` / ``total_keys`` for a call with ``m`` keys (errors name the argument).

    This call's keys are the global keys [key_offset, key_offset + m) of
    ``total_keys`` (0 = m: no sharding); only the dropout mask depends on them.
    """
    for name, val in (("key_offset", key_offset), ("total_keys", total_keys)):
        if not isinstance(val, int) or isinstance(val, bool):
            raise TypeError(f"{op}: {name} must be an int, got {val!r}")
    if key_offset < 0:
        raise ValueError(f"{op}: key_offset must be >= 0, got {key_offset}")
    if total_keys < 0:
        raise ValueError(f"{op}: total_keys must be >= 0 (0 = this call's M = {m} keys), got {total_keys}")
    if total_keys == 0 and key_offset != 0:
        raise ValueError(f"{op}: key_offset={key_offset} needs total_keys > 0 (total_keys=0 means this call's "
                         f"M = {m} keys are all the keys)")
    if total_keys > 0 and key_offset + m > total_keys:
        raise ValueError(f"{op}: key_offset + M = {key_offset} + {m} = {key_offset + m} exceeds total_keys="
                         f"{total_keys} (this call's keys must be the global keys [key_offset, key_offset + M))")


@torch.library.custom_op("perceiver_fast::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                  seed: Optional[Tensor], dropout_p: float, softmax_scale: float,
                  num_splits: int, backend: str, causal: bool = False,
                  softcap: float = 0.0, key_offset: int = 0, total_keys: int = 0) -> Tuple[Tensor, Tensor]:
    """Forward: (out (B, N, H, Dv) in q's dtype, lse fp32 (B, H, N)).

    ``num_splits``: split-KV count, 0 = sized from the SM count and tile count.
    ``backend``: "auto", "triton" or "torch" (see :func:`.backend.resolve_backend`).
    ``causal``: bottom-right causal mask; ``softcap`` > 0: scores capped by ``softcap * tanh(s / softcap)``.
    ``key_offset`` / ``total_keys``: this call's M keys are the global keys
    [key_offset, key_offset + M) of ``total_keys`` (0 = M, no sharding). Only
    the dropout mask depends on them: the keep decision for (b, h, n, global
    key j) is the one the unsharded call over all ``total_keys`` keys draws,
    so shards of the keys reproduce its mask (:mod:`perceiver_fast.distributed`).
    k and v may have fewer heads than q (grouped-query heads).
    """
    check_op_args("attention_fwd", q, k, softcap, softmax_scale)
    check_key_range("attention_fwd", key_offset, total_keys, k.shape[1])
    if resolve_backend(backend, q) == "triton":
        from perceiver_fast.ops.attention_triton import attention_fwd_triton

        return attention_fwd_triton(q, k, v, key_padding_mask, seed, dropout_p, softmax_scale, num_splits,
                                    causal=causal, softcap=softcap, key_offset=key_offset, total_keys=total_keys)
    return attention_fwd_cpu(q, k, v, key_padding_mask, seed_to_int(seed), dropout_p, softmax_scale,
                             causal=causal, softcap=softcap, key_offset=key_offset, total_keys=total_keys)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, key_padding_mask, seed, dropout_p, softmax_scale, num_splits, backend,
                        causal=False, softcap=0.0, key_offset=0, total_keys=0):
    B, N, H, Dv = k.shape[0], q.shape[1], q.shape[2], v.shape[3]
    return q.new_empty((B, N, H, Dv)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("perceiver_fast::attention_bwd", mutates_args=())
def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  key_padding_mask: Optional[Tensor], seed: Optional[Tensor], dropout_p: float,
                  softmax_scale: float, num_splits: int, backend: str, causal: bool = False,
                  softcap: float = 0.0, key_offset: int = 0,
                  total_keys: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward: (dq, dk, dv) with the shapes and dtypes of q, k, v (contiguous).

    ``key_offset`` / ``total_keys`` as in :func:`attention_fwd` (the same values regenerate its dropout mask).
    """
    check_op_args("attention_bwd", q, k, softcap, softmax_scale)
    check_key_range("attention_bwd", key_offset, total_keys, k.shape[1])
    if resolve_backend(backend, q) == "triton":
        from perceiver_fast.ops.attention_triton import attention_bwd_triton

        return attention_bwd_triton(grad_out, q, k, v, out, lse, key_padding_mask, seed, dropout_p, softmax_scale,
                                    num_splits=num_splits, causal=causal, softcap=softcap, key_offset=key_offset,
                                    total_keys=total_keys)
    return attention_bwd_cpu(grad_out, q, k, v, out, lse, key_padding_mask, seed_to_int(seed), dropout_p,
                             softmax_scale, causal=causal, softcap=softcap, key_offset=key_offset,
                             total_keys=total_keys)


@attention_bwd.register_fake
def _attention_bwd_fake(grad_out, q, k, v, out, lse, key_padding_mask, seed, dropout_p, softmax_scale, num_splits,
                        backend, causal=False, softcap=0.0, key_offset=0, total_keys=0):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    (q, k, v, key_padding_mask, seed, dropout_p, softmax_scale, num_splits, backend, causal, softcap, key_offset,
     total_keys) = inputs
    out, lse = output
    # The lse is for merging partial attentions; its gradient is not computed, so it must not look
    # differentiable: a backward through it fails loudly instead of giving zeros.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
    ctx.dropout_p = dropout_p
    ctx.softmax_scale = softmax_scale
    ctx.num_splits = num_splits
    ctx.backend = backend
    ctx.causal = causal
    ctx.softcap = softcap
    ctx.key_offset = key_offset
    ctx.total_keys = total_keys


def _backward(ctx, grad_out, grad_lse):
    # The lse output is for merging partial attentions; its gradient is not propagated (as in FlashAttention).
    q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, seed,
                               ctx.dropout_p, ctx.softmax_scale, ctx.num_splits, ctx.backend, ctx.causal, ctx.softcap,
                               ctx.key_offset, ctx.total_keys)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
def draw_dropout_seed(dropout_p: float) -> Optional[Tensor]:
    """The ops' dropout seed: an int64 (1,) tensor drawn from torch's default CPU generator (None without dropout).

    Drawn there so that ``torch.manual_seed`` reproduces a run.
    """
    if dropout_p <= 0.0:
        return None
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def _check_knobs(op: str, num_splits: int, backend: str, causal: bool = False, softcap: float = 0.0,
                 return_lse: bool = False) -> None:
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"{op}: num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    if backend not in ("auto", "triton", "torch", "sdpa"):
        raise ValueError(f"{op}: backend must be 'auto', 'triton', 'torch' or 'sdpa', got {backend!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {causal!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"{op}: return_lse must be a bool, got {return_lse!r}")
    if (not isinstance(softcap, (float, int)) or isinstance(softcap, bool) or not math.isfinite(softcap)
            or softcap < 0):
        raise ValueError(f"{op}: softcap must be a finite float >= 0 (0 = no capping), got {softcap!r}")


def cross_attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                    dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
                    softcap: float = 0.0, return_lse: bool = False, num_splits: int = 0,
                    backend: str = "auto") -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Latent-to-input cross-attention ``softmax(cap(q k^T * scale) + mask) v``.

    Args:
        q: (Bq, N, H, Dqk) queries, Bq in {1, B}. Bq == 1 is a batch-shared
            latent array: it is not expanded and its gradient is summed over
            the batch.
        k: (B, M, Hkv, Dqk) keys. v: (B, M, Hkv, Dv) values. Hkv divides H
            (grouped-query / multi-query heads: query head h reads key/value
            head h // (H // Hkv); K/V are never repeated in memory). Any
            strides with a contiguous last dim (e.g. views of a packed kv
            projection); rows whose strides are multiples of 16 bytes stream
            by TMA, others are repacked once on the GPU.
        key_padding_mask: optional bool (B, M), True = attend. Queries with no
            attended key output zeros and get zero gradient.
        dropout_p: attention dropout probability in [0, 1); pass 0.0 in eval.
        softmax_scale: defaults to Dqk ** -0.5.
        causal: query i attends key j only if j <= i + M - N (aligned
            bottom-right, as FlashAttention 2); combines with the key padding
            mask. Query rows with no key (N > M) output zeros.
        softcap: if > 0, scores are capped as ``softcap * tanh(s / softcap)``
            (s = q k^T * scale) before the mask and the softmax (Gemma 2).
        return_lse: also return the fp32 (B, H, N) natural-log log-sum-exp of
            the (capped, masked) scores, +inf for a query with no attended key,
            for merging partial attentions. It carries no gradient.
        num_splits: split-KV count of the GPU kernels; 0 (default) sizes it
            from the SM count and the tile count.
        backend: "auto" (Triton kernels on CUDA or under TRITON_INTERPRET=1,
            else the PyTorch path), "triton" or "torch".

    Returns:
        (B, N, H, Dv) in the input dtype (fp32 accumulation), or
        ``(out, lse)`` with ``return_lse=True``.
    """
    _check_cross(q, k, v, key_padding_mask, dropout_p)
    _check_knobs("cross_attention", num_splits, backend, causal, softcap, return_lse)
    if backend == "sdpa":
        raise ValueError("cross_attention: backend='sdpa' is for self_attention only")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, lse = attention_fwd(q, k, v, key_padding_mask, draw_dropout_seed(dropout_p), float(dropout_p), scale,
                             num_splits, backend, causal, float(softcap))
    return (out, lse) if return_lse else out


def sdpa_accepts(q: Tensor, k: Tensor, dropout_p: float, causal: bool = False, softcap: float = 0.0) -> bool:
    """Whether a self-attention call is one SDPA's fused GPU kernels (cuDNN, flash) take with our semantics.

    Same maths, no batch-shared q, no key mask; 16-bit, head dim a multiple of 8
    up to 256, no dropout (ours is reproducible from torch's seed with our own
    Philox stream, SDPA's is not the same stream), no soft-capping, and as many
    key/value heads as query heads. Causal self-attention (N == M) is the same
    mask in SDPA's top-left and our bottom-right convention.
    """
    D = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0
            and D % 8 == 0 and D <= 256 and softcap == 0.0 and k.shape[2] == q.shape[2])


def self_attention(q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0,
                   softmax_scale: Optional[float] = None, causal: bool = False, softcap: float = 0.0,
                   return_lse: bool = False, backend: str = "auto") -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Multi-head self-attention over (B, N, H, D) queries and (B, N, Hkv, D) keys/values, any D from 1 to 4096.

    q, k and v may be views of one packed (B, N, 3, H, D) projection
    (``qkv.unbind(2)``); they are used in place, without copies. Hkv divides H
    (grouped-query heads, as :func:`cross_attention`).
    dropout_p in [0, 1) (pass 0.0 in eval); softmax_scale defaults to D ** -0.5;
    ``causal``, ``softcap`` and ``return_lse`` as in :func:`cross_attention`.
    backend: "auto" runs SDPA's fused kernels where they take the call with the
    same semantics (:func:`sdpa_accepts`, as xformers dispatches), else our
    kernels; "triton", "torch" and "sdpa" force one ("sdpa" has no lse).
    Returns (B, N, H, D) in the input dtype, or ``(out, lse)`` with ``return_lse=True``.
    """
    _check_self(q, k, v, dropout_p)
    _check_knobs("self_attention", 0, backend, causal, softcap, return_lse)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if backend == "sdpa" and (return_lse or softcap > 0.0):
        raise ValueError("self_attention: backend='sdpa' has no return_lse and no softcap")
    if backend == "sdpa" or (backend == "auto" and not return_lse and sdpa_accepts(q, k, dropout_p, causal, softcap)):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=float(dropout_p), scale=scale,
            is_causal=causal, enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)
    out, lse = attention_fwd(q, k, v, None, draw_dropout_seed(dropout_p), float(dropout_p), scale, 1, backend,
                             causal, float(softcap))
    return (out, lse) if return_lse else out
