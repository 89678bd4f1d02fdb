"""Routing of the layers' attention calls to the fused ops or the eager reference.

Every layer takes ``attention="fused" | "eager"``:

* ``"fused"``: :func:`perceiver_fast.ops.attention.cross_attention` /
  :func:`~perceiver_fast.ops.attention.self_attention` (Triton kernels);
* ``"eager"``: :func:`perceiver_fast.ops.reference.attention_reference`
  (matmul, softmax, matmul), the baseline and the oracle of the tests.

All tensors use the (batch, seq, heads, head_dim) layout of the ops.
"""
from __future__ import annotations

from typing import Optional

import torch

from perceiver_fast.ops.attention import SUPPORTED_DTYPES
from perceiver_fast.ops.reference import attention_reference

ATTENTION_MODES = ("fused", "eager")


# The dtypes the fused attention ops take; integrations send other dtypes (float64) to the library's own code.
FUSED_ATTENTION_DTYPES = SUPPORTED_DTYPES


def fused_attention_takes(attention: str, dtype: torch.dtype) -> bool:
    """Whether ``attention`` can run on tensors of ``dtype`` (the eager reference takes every float dtype)."""
    return attention != "fused" or dtype in FUSED_ATTENTION_DTYPES


def check_attention(attention: str) -> str:
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    return attention


try:  # imported eagerly (not inside the forward) so torch.compile traces the calls without graph breaks
    from perceiver_fast.ops import attention as _attention_ops
    _ATTENTION_IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover - depends on the environment
    _attention_ops = None
    _ATTENTION_IMPORT_ERROR = _exc


def fused_ops():
    """perceiver_fast.ops.attention, or an ImportError that says why the Triton kernels are unavailable."""
    if _attention_ops is None:  # pragma: no cover
        raise ImportError(
            "attention='fused' needs perceiver_fast.ops.attention (the Triton kernels), which could not be "
            f"imported ({_ATTENTION_IMPORT_ERROR}); use attention='eager' or install triton"
        )
    return _attention_ops


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attention: str,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q (Bq, N, H, Dqk) with Bq in {1, B}, k (B, M, Hkv, Dqk), v (B, M, Hkv, Dv) -> (B, N, H, Dv).

    ``dropout_p`` must already be 0 outside training (the fused op has no
    ``training`` flag). ``causal`` (bottom-right) and ``softcap`` as in
    :func:`perceiver_fast.ops.attention.cross_attention`.
    """
    if attention == "fused":
        return fused_ops().cross_attention(
            q, k, v, key_padding_mask=key_padding_mask, dropout_p=dropout_p, softmax_scale=softmax_scale,
            causal=causal, softcap=softcap,
        )
    if q.shape[0] != k.shape[0]:
        q = q.expand(k.shape[0], *q.shape[1:])  # the reference's matmul broadcasts anyway; keep shapes explicit
    return attention_reference(
        q, k, v, key_padding_mask=key_padding_mask, softmax_scale=softmax_scale, dropout_p=dropout_p, training=True,
        causal=causal, softcap=softcap,
    )


def self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attention: str,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """q, k, v (B, N, H, D), possibly strided views of a packed (B, N, 3, H, D) projection.

    A v wider or narrower than q/k goes to the fused cross-attention op, which takes Dv != Dqk.
    """
    if attention == "fused":
        ops = fused_ops()
        if v.shape[-1] != q.shape[-1]:
            return ops.cross_attention(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale)
        return ops.self_attention(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale)
    return attention_reference(q, k, v, softmax_scale=softmax_scale, dropout_p=dropout_p, training=True)
