"""krasserm's perceiver-io (``perceiver.model.core.modules.MultiHeadAttention``) on the fused attention op.

Registers :data:`KRASSERM_ATTENTION_PATCH` ("perceiver-io MultiHeadAttention") with
:mod:`perceiver_fast.integrations.patching`, so :func:`~perceiver_fast.integrations.patching.patch_model` and
:func:`~perceiver_fast.integrations.patching.patch_classes` fuse every ``MultiHeadAttention`` of the package: the
cross- and self-attention layers of ``PerceiverEncoder`` / ``PerceiverDecoder`` / ``PerceiverIO`` and the causal
prefix cross-attention and causal self-attention of ``PerceiverAR`` / ``CausalSequenceModel``. perceiver-io is
imported lazily, only when a model is patched.

The fused forward keeps the package's own computation around the attention (its projections, its
``q * dp_scale`` before the rotation, its :class:`RotaryPositionEmbedding` ``rotate``, its kv-cache concatenation
and the ``ModuleOutput(last_hidden_state, kv_cache)`` it returns) and replaces only the
``einsum -> masked_fill -> softmax -> dropout -> einsum`` loop over head chunks with one fused call:

* ``pad_mask`` (bool, True = pad) becomes the op's ``key_padding_mask`` (True = attend);
* the queries are already scaled by ``dp_scale`` (before the rotation, as the package does), so the op gets
  ``softmax_scale=1.0``;
* ``causal_attention``: the package masks ``triu(j - i + 1)`` of the (i, j) score matrix, i.e. query ``n`` sees
  key ``m <= n + M - N``: the op's bottom-right ``causal=True``, exactly;
* a query with no key to attend (all keys padded, or causal with ``N > M``) gets, in the package, every score
  ``-finfo.max``, hence a uniform softmax: the average of *all* ``M`` values. The op gives zeros there; the patch
  replaces those rows with the mean of ``v`` by ``torch.where`` (no host synchronisation);
* ``max_heads_parallel`` (heads processed in chunks) only bounds the package's memory: all heads go in one call;
* queries shared across the batch (``PerceiverEncoder``'s latents have batch 1) stay ``Bq = 1``, not expanded;
* dropout ``self.dropout.p`` while ``self.dropout`` is in training mode, else 0.

Falls back to the package's own forward (same arguments), and why:

* dtypes outside ``dispatch.FUSED_ATTENTION_DTYPES`` (float64), q/k/v of different dtypes or devices, autocast
  (the package's einsums run in autocast's precision: not reproduced), head dims the op does not take;
* a ``pad_mask`` that is not a bool (B, M) / (1, M) tensor, key batch 1 with query batch B > 1, no keys or no
  queries, rotary embeddings of another type than the package's ``RotaryPositionEmbedding``, a ``dropout`` that is
  not exactly an ``nn.Dropout``, arguments the package's forward would not bind;
* attention dropout in training when some query may have no key to attend: the package drops the entries of the
  uniform row, which the op does not draw. Causal with ``N > M`` falls back outright; with a ``pad_mask`` one
  host-side check (``pad_mask`` fully set for some sample, or no unpadded key in some query's causal window)
  decides, in that training-with-dropout case only.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from perceiver_fast.integrations.patching import AttentionPatch, register_attention_patch
from perceiver_fast.integrations.calls import bind_call
from perceiver_fast.layers import dispatch

__all__ = ["KRASSERM_ATTENTION_PATCH", "KIND", "fused_multi_head_attention_forward", "empty_query_rows"]

KIND = "perceiver-io MultiHeadAttention"

# MultiHeadAttention.forward's parameters, in positional order, with their defaults (the first two required).
PARAMS = tuple((name, None) for name in ("x_q", "x_kv", "pad_mask", "rot_pos_emb_q", "rot_pos_emb_k", "kv_cache"))


def empty_query_rows(attend: Optional[torch.Tensor], b: int, n: int, m: int, causal: bool,
                     device: torch.device) -> Optional[torch.Tensor]:
    """(B', N) bool, True where a query has no key to attend (B' is B, or 1 without a key mask), or None when no
    query can be without one. ``attend``: (B, M) bool, True = attend. No host synchronisation."""
    if not causal:
        return None if attend is None else ~attend.any(-1, keepdim=True).expand(b, n)
    last = torch.arange(n, device=device) + (m - n)  # the last key query i may see
    if attend is None:
        return None if m >= n else (last < 0).unsqueeze(0)
    seen = attend.to(torch.int32).cumsum(-1)  # (B, M): attended keys among 0..j
    counts = seen.gather(1, last.clamp(min=0).unsqueeze(0).expand(attend.shape[0], n))
    return (counts == 0) | (last < 0).unsqueeze(0)


def _plan(mod: nn.Module, call: dict):
    """(q, k, v, attend, kv_cache_out, dropout_p) for the fused op, or None to run the package's forward.

    q (Bq, N, H, Dqk) scaled and rotated as the package does, k (B, M, H, Dqk) rotated, v (B, M, H, Dv) with
    strided views in the (batch, seq, heads, head_dim) layout; ``attend`` (B, M) bool True = attend, or None.
    Everything decidable from the arguments is decided before anything is projected.
    """
    x_q, x_kv, pad_mask = call["x_q"], call["x_kv"], call["pad_mask"]
    rot_q, rot_k, kv_cache = call["rot_pos_emb_q"], call["rot_pos_emb_k"], call["kv_cache"]
    if not (isinstance(x_q, torch.Tensor) and isinstance(x_kv, torch.Tensor)) or x_q.dim() != 3 or x_kv.dim() != 3:
        return None
    device = x_q.device
    if torch.is_autocast_enabled(device.type) or x_q.is_nested or x_kv.is_nested or x_kv.device != device:
        return None
    weights = (mod.q_proj.weight, mod.k_proj.weight, mod.v_proj.weight)
    if any(t.dtype not in dispatch.FUSED_ATTENTION_DTYPES for t in (x_q, x_kv, *weights)):
        return None  # float64
    from perceiver.model.core.position import RotaryPositionEmbedding

    if any(r is not None and not isinstance(r, RotaryPositionEmbedding) for r in (rot_q, rot_k)):
        return None
    if type(mod.dropout) is not nn.Dropout:
        return None
    h = mod.num_heads
    b, n, m = x_kv.shape[0], x_q.shape[1], x_kv.shape[1]
    if kv_cache is not None:
        if not (isinstance(kv_cache, (tuple, list)) and len(kv_cache) == 2
                and all(isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] == b for t in kv_cache)
                and kv_cache[0].shape[1] == kv_cache[1].shape[1]):
            return None
        m += kv_cache[0].shape[1]
    max_d = dispatch.fused_ops().MAX_HEAD_DIM
    d_qk, d_v = mod.num_qk_channels // h, mod.num_v_channels // h
    if not (1 <= d_qk <= max_d and 1 <= d_v <= max_d) or x_q.shape[0] not in (1, b) or 0 in (b, n, m):
        return None
    attend = None
    if pad_mask is not None:
        if (not isinstance(pad_mask, torch.Tensor) or pad_mask.dtype != torch.bool or pad_mask.device != device
                or pad_mask.dim() != 2 or pad_mask.shape[1] != m or pad_mask.shape[0] not in (1, b)):
            return None
        attend = (~pad_mask).expand(b, m)
    causal = bool(mod.causal_attention)
    p = float(mod.dropout.p) if mod.dropout.training else 0.0
    if p > 0.0:
        if causal and n > m:
            return None  # some rows are uniform: the package drops their entries
        if attend is not None:
            empty = empty_query_rows(attend, b, n, m, causal, device)
            if bool(empty.any()):  # the one host-side check, in training with dropout and a pad mask only
                return None

    # The package's own steps, up to the scores: projections, kv cache, heads, dp_scale, rotation.
    q = mod.q_proj(x_q)
    k = mod.k_proj(x_kv)
    v = mod.v_proj(x_kv)
    if kv_cache is not None:
        k_cache, v_cache = kv_cache
        k = torch.cat([k_cache, k], dim=1)
        v = torch.cat([v_cache, v], dim=1)
        kv_cache = (k, v)
    q, k, v = (t.unflatten(-1, (h, t.shape[-1] // h)) for t in (q, k, v))  # (b, n, h, c) views
    q = q * mod.dp_scale
    if rot_q is not None:
        q = rot_q.rotate(q.transpose(1, 2)).transpose(1, 2)  # rotate takes (b, h, n, c)
    if rot_k is not None:
        k = rot_k.rotate(k.transpose(1, 2)).transpose(1, 2)
    # What the arguments did not tell: dtypes after the kv cache / rotation, shapes the rotation broadcast.
    dtype = q.dtype
    if (dtype not in dispatch.FUSED_ATTENTION_DTYPES or k.dtype != dtype or v.dtype != dtype
            or k.device != device or v.device != device or k.shape[:2] != (b, m) or v.shape[:2] != (b, m)
            or q.shape[0] not in (1, b) or q.shape[1] != n):
        return None
    return q, k, v, attend, kv_cache, p


def fused_multi_head_attention_forward(original: Callable) -> Callable:
    """The fused ``forward`` of krasserm's ``MultiHeadAttention``; ``original`` runs every call not fused."""
    from perceiver.model.core.utils import ModuleOutput

    def forward(self, *args, **kwargs):
        call = bind_call(PARAMS, args, kwargs, required=2)
        plan = None if call is None else _plan(self, call)
        if plan is None:
            return original(self, *args, **kwargs)
        q, k, v, attend, kv_cache, p = plan
        causal = bool(self.causal_attention)
        b, m, n = k.shape[0], k.shape[1], q.shape[1]
        o = dispatch.fused_ops().cross_attention(q, k, v, key_padding_mask=attend, dropout_p=p, softmax_scale=1.0,
                                                 causal=causal)  # (B, N, H, Dv)
        empty = empty_query_rows(attend, b, n, m, causal, q.device)
        if empty is not None:  # the package's uniform average of all values, where no key is attended
            o = torch.where(empty[:, :, None, None], v.mean(dim=1, keepdim=True), o)
        o = self.o_proj(o.reshape(b, n, -1))
        return ModuleOutput(last_hidden_state=o, kv_cache=kv_cache)

    return forward


KRASSERM_ATTENTION_PATCH: AttentionPatch = register_attention_patch(AttentionPatch(
    kind=KIND,
    module="perceiver.model.core.modules",
    qualname="MultiHeadAttention",
    make_forward=fused_multi_head_attention_forward,
))
