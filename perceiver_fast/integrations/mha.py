"""In-place acceleration of ``torch.nn.MultiheadAttention``.

``patch_multihead_attention(model)`` overrides ``forward`` on every ``nn.MultiheadAttention`` instance of
``model`` (an instance attribute: parameters, their names and ``state_dict`` are untouched, so checkpoints
load either way; patching twice does not wrap twice). ``unpatch_multihead_attention(model)`` deletes the
override, so the class forward shows through again.

The patched forward sends each call that :func:`perceiver_fast.ops.attention.cross_attention` expresses
exactly to it (in-projection and out-projection with the module's own weights, as
``F.multi_head_attention_forward`` does), and every other call to the original forward with the original
arguments. Fused:

* ``batch_first`` True or False, and unbatched 2-D inputs; self-, encoder-decoder and cross-attention;
  packed ``in_proj_weight`` or separate ``q/k/v_proj_weight`` (kdim/vdim != embed_dim); with or without
  biases; ``add_bias_kv`` (the bias key/value is appended as an always-attended key) and ``add_zero_attn``;
* ``need_weights=False`` (``need_weights=True``, torch's default, runs the original forward, unless the model
  was patched with ``ignore_need_weights=True``: an explicit opt-in for callers that discard the weights, such
  as transformers' ``Siglip2MultiheadAttentionPoolingHead`` (``self.attention(probe, h, h, attn_mask=m)[0]``);
  then the fused call returns ``(out, None)``);
* ``key_padding_mask`` bool (True = pad) or additive float, and an ``attn_mask`` ((L, S) or (B*H, L, S), bool
  or float) whose values do not vary over the queries and heads, i.e. a key-padding mask in disguise (SigLIP's
  pooling head). The masks are merged as torch merges them (sum of additive masks); the merged mask must hold
  only 0 (attend) and -inf or ``finfo(dtype).min`` (ignore: both give a masked key exactly zero weight), and
  every query must attend at least one key. One host-side check per masked call decides this;
* dropout ``module.dropout`` in training only; the softmax scale is head_dim ** -0.5, as torch's.

Falls back (original forward, same arguments), and why:

* ``need_weights=True`` without the opt-in: the fused op does not materialise the weights;
* a per-query or per-head ``attn_mask`` (causal, banded, ...), any other mask value, float masks of another dtype
  than the query, bool and float masks mixed (torch warns), a float mask that requires grad (torch differentiates
  through it), ``is_causal=True`` (torch's hint semantics differ between its code paths);
* a query whose keys are all masked: torch gives NaN (``need_weights=True`` path, native fast path), zeros
  (SDPA path, -inf) or the uniform average of all values (``finfo.min``), depending on the call;
* dtypes outside ``dispatch.FUSED_ATTENTION_DTYPES`` (float64), mixed dtypes or devices, autocast, nested
  tensors, empty inputs, head dims the op does not take, or arguments torch would reject (torch raises its own
  error).

Subclasses that override ``forward`` (e.g. ``torch.ao.nn.quantizable.MultiheadAttention``) and instances whose
``forward`` someone else already replaced (e.g. accelerate hooks) are left alone and listed in the report.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from perceiver_fast.integrations.calls import bind_call
from perceiver_fast.layers import dispatch

_ORIG = "_perceiver_fast_mha_original_forward"  # not timm.py's name: a module is one or the other
_IGNORE_NEED_WEIGHTS = "_pf_ignore_need_weights"

# nn.MultiheadAttention.forward's parameters, in positional order, with their defaults.
_PARAMS = (("query", None), ("key", None), ("value", None), ("key_padding_mask", None), ("need_weights", True),
           ("attn_mask", None), ("average_attn_weights", True), ("is_causal", False))


@dataclass
class MHAPatchReport:
    """What :func:`patch_multihead_attention` did: the modules it patched (qualified names, ``""`` for the root)
    and the ``nn.MultiheadAttention`` modules it left alone, with the reason."""

    patched: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)

    @property
    def num_patched(self) -> int:
        return len(self.patched)


def _weights(mod: nn.MultiheadAttention) -> Tuple[Optional[torch.Tensor], ...]:
    if mod._qkv_same_embed_dim:
        return (mod.in_proj_weight, mod.in_proj_bias, mod.out_proj.weight, mod.out_proj.bias, mod.bias_k, mod.bias_v)
    return (mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight, mod.in_proj_bias, mod.out_proj.weight,
            mod.out_proj.bias, mod.bias_k, mod.bias_v)


def _shapes_ok(mod: nn.MultiheadAttention, query, key, value, kpm, attn_mask) -> bool:
    """Inputs torch accepts and the fused op takes (torch's own checks, for the cases we fuse)."""
    batched = query.dim() == 3
    if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
        return False
    if batched:
        bf = mod.batch_first
        b = query.shape[0] if bf else query.shape[1]
        l = query.shape[1] if bf else query.shape[0]
        s = key.shape[1] if bf else key.shape[0]
        if (key.shape[0 if bf else 1] != b or value.shape[0 if bf else 1] != b
                or value.shape[1 if bf else 0] != s):
            return False
    else:
        b, l, s = 1, query.shape[0], key.shape[0]
        if value.shape[0] != s:
            return False
    if query.shape[-1] != mod.embed_dim or key.shape[-1] != mod.kdim or value.shape[-1] != mod.vdim:
        return False
    if mod._qkv_same_embed_dim and key.shape != value.shape:
        return False
    if b == 0 or l == 0 or s == 0:
        return False
    if kpm is not None and tuple(kpm.shape) != ((b, s) if batched else (s,)):
        return False
    if attn_mask is not None and tuple(attn_mask.shape) not in ((l, s), (b * mod.num_heads, l, s)):
        return False
    d = mod.embed_dim // mod.num_heads
    return d * mod.num_heads == mod.embed_dim and 1 <= d <= dispatch.fused_ops().MAX_HEAD_DIM


def _is_mask(mask, dtype: torch.dtype) -> bool:
    """bool, or floating of the query's dtype (torch's SDPA path rejects other float dtypes)."""
    return isinstance(mask, torch.Tensor) and (mask.dtype == torch.bool or mask.dtype == dtype)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch's ``F._canonical_mask``: bool True -> -inf, float unchanged."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask


def _key_mask(mod: nn.MultiheadAttention, kpm, attn_mask, b: int, s: int, dtype: torch.dtype,
              extra_keys: bool) -> Tuple[bool, Optional[torch.Tensor]]:
    """(fusable, (B, S) bool key mask with True = attend, or None for no mask).

    The merged additive mask (torch adds ``attn_mask`` and ``key_padding_mask``) must be a key-padding mask:
    the same over queries and heads, every value 0, -inf or finfo(dtype).min, and (unless bias_kv / zero-attn
    appended an always-attended key) every row with a key to attend. One host sync decides.
    """
    if kpm is None and attn_mask is None:
        return True, None
    if kpm is not None and attn_mask is not None and kpm.dtype != attn_mask.dtype:
        return False, None  # torch warns (deprecated); let it
    conds = []
    if kpm is not None and attn_mask is None and kpm.dtype == torch.bool:
        attend = ~kpm.reshape(b, s)
        if extra_keys:
            return True, attend  # no check at all: every row attends the appended key
        conds.append(attend.any(-1).all())
    else:
        total = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                row = attn_mask[:1]  # (1, S)
                conds.append((attn_mask == row).all())
            else:
                per_head = attn_mask.reshape(b, mod.num_heads, attn_mask.shape[-2], s)
                row = per_head[:, 0, 0, :]  # (B, S)
                conds.append((per_head == row[:, None, None, :]).all())
            total = _additive(row, dtype)
        if kpm is not None:
            add = _additive(kpm.reshape(b, s), dtype)
            total = add if total is None else total + add
        total = total.expand(b, s)
        attend = total == 0
        conds.append((attend | (total == float("-inf")) | (total == torch.finfo(dtype).min)).all())
        if not extra_keys:
            conds.append(attend.any(-1).all())
    ok = torch.stack(conds).all() if len(conds) > 1 else conds[0]
    if not bool(ok):  # the one host-side check
        return False, None
    return True, attend


def _fused_forward(mod: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attend: Optional[torch.Tensor]) -> torch.Tensor:
    batched = query.dim() == 3
    if not batched:  # torch ignores batch_first for unbatched inputs; work batch-first with B = 1
        same_kv = key is value
        same_qk = query is key
        query = query.unsqueeze(0)
        key = query if same_qk else key.unsqueeze(0)
        value = key if same_kv else value.unsqueeze(0)
    bf = mod.batch_first or not batched
    e, h = mod.embed_dim, mod.num_heads
    d = e // h
    if mod._qkv_same_embed_dim:  # torch's _in_projection_packed, including its identity shortcuts
        w, bias = mod.in_proj_weight, mod.in_proj_bias
        bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
        if query is key and key is value:
            q, k, v = F.linear(query, w, bias).unflatten(-1, (3, h, d)).unbind(-3)
        elif key is value:
            q = F.linear(query, w[:e], bq).unflatten(-1, (h, d))
            kv_bias = None if bias is None else bias[e:]
            k, v = F.linear(key, w[e:], kv_bias).unflatten(-1, (2, h, d)).unbind(-3)
        else:
            wq, wk, wv = w.chunk(3)
            q, k, v = (F.linear(x, wx, bx).unflatten(-1, (h, d))
                       for x, wx, bx in ((query, wq, bq), (key, wk, bk), (value, wv, bv)))
    else:
        bias = mod.in_proj_bias
        bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
        q = F.linear(query, mod.q_proj_weight, bq).unflatten(-1, (h, d))
        k = F.linear(key, mod.k_proj_weight, bk).unflatten(-1, (h, d))
        v = F.linear(value, mod.v_proj_weight, bv).unflatten(-1, (h, d))
    if not bf:  # (L, B, H, D) -> (B, L, H, D): strided views, head dim stays contiguous
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    b, n = q.shape[0], q.shape[1]
    appended = 0
    if mod.bias_k is not None and mod.bias_v is not None:
        k = torch.cat([k, mod.bias_k.reshape(1, 1, h, d).expand(b, 1, h, d)], dim=1)
        v = torch.cat([v, mod.bias_v.reshape(1, 1, h, d).expand(b, 1, h, d)], dim=1)
        appended += 1
    if mod.add_zero_attn:
        k = torch.cat([k, k.new_zeros(b, 1, h, d)], dim=1)
        v = torch.cat([v, v.new_zeros(b, 1, h, d)], dim=1)
        appended += 1
    if attend is not None and appended:
        attend = torch.cat([attend, attend.new_ones(b, appended)], dim=1)
    p = float(mod.dropout) if (mod.training and mod.dropout > 0) else 0.0
    o = dispatch.cross_attention(q, k, v, attention="fused", key_padding_mask=attend, dropout_p=p,
                                 softmax_scale=d ** -0.5)  # (B, N, H, D)
    o = o.reshape(b, n, e)
    if not bf:
        o = o.transpose(0, 1)
    out = F.linear(o, mod.out_proj.weight, mod.out_proj.bias)
    return out if batched else out.squeeze(0)


_NO = (False, None)


def _fast_forward(self, *args, **kwargs):
    call = bind_call(_PARAMS, args, kwargs, required=3)
    fusable, attend = _NO if call is None else _plan(self, call, getattr(self, _IGNORE_NEED_WEIGHTS))
    if not fusable:
        return getattr(self, _ORIG)(*args, **kwargs)  # torch's own code, same arguments
    return _fused_forward(self, call["query"], call["key"], call["value"], attend), None


def make_multihead_attention_forward(original: Callable, *, ignore_need_weights: bool = False) -> Callable:
    """A class-level ``nn.MultiheadAttention.forward`` (for a global patch): the calls the fused op expresses
    exactly run fused, every other call ``original(self, *args, **kwargs)``. Same rules as
    :func:`patch_multihead_attention`."""
    def forward(self, *args, **kwargs):
        call = bind_call(_PARAMS, args, kwargs, required=3)
        fusable, attend = _NO if call is None else _plan(self, call, ignore_need_weights)
        if not fusable:
            return original(self, *args, **kwargs)
        return _fused_forward(self, call["query"], call["key"], call["value"], attend), None

    forward.__doc__ = original.__doc__
    return forward


def _plan(mod: nn.MultiheadAttention, call: dict,
          ignore_need_weights: bool) -> Tuple[bool, Optional[torch.Tensor]]:
    """(whether the fused op expresses the call exactly, its (B, S) bool key mask, True = attend, or None)."""
    query, key, value = call["query"], call["key"], call["value"]
    kpm, attn_mask = call["key_padding_mask"], call["attn_mask"]
    if call["is_causal"] is not False or (call["need_weights"] and not ignore_need_weights):
        return _NO
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return _NO
    dtype = query.dtype
    if (dtype not in dispatch.FUSED_ATTENTION_DTYPES or key.dtype != dtype or value.dtype != dtype
            or any(t.is_nested for t in (query, key, value))
            or any(w is not None and w.dtype != dtype for w in _weights(mod))
            or torch.is_autocast_enabled(query.device.type)):
        return _NO
    masks = [m for m in (kpm, attn_mask) if m is not None]
    if not all(_is_mask(m, dtype) for m in masks):
        return _NO
    if torch.is_grad_enabled() and any(m.requires_grad for m in masks):
        return _NO  # torch differentiates through a float mask; a key mask has no gradient
    device = query.device
    if (any(t.device != device for t in (key, value, *masks))
            or any(w is not None and w.device != device for w in _weights(mod))):
        return _NO
    if not _shapes_ok(mod, query, key, value, kpm, attn_mask):
        return _NO
    if (mod.bias_k is None) != (mod.bias_v is None):
        return _NO
    batched = query.dim() == 3
    b = (query.shape[0] if mod.batch_first else query.shape[1]) if batched else 1
    s = (key.shape[1] if mod.batch_first else key.shape[0]) if batched else key.shape[0]
    extra = mod.bias_k is not None or mod.add_zero_attn
    return _key_mask(mod, kpm, attn_mask, b, s, dtype, extra)


def _why_not(module: nn.Module) -> Optional[str]:
    if hasattr(module, _ORIG):
        return f"already patched (ignore_need_weights={getattr(module, _IGNORE_NEED_WEIGHTS)}); unpatch first to " \
               f"change options"
    if type(module).forward is not nn.MultiheadAttention.forward:
        return f"{type(module).__name__} overrides nn.MultiheadAttention.forward"
    if "forward" in vars(module):
        return "forward already replaced on the instance by someone else (e.g. accelerate hooks)"
    return None


def patch_multihead_attention(model: nn.Module, *, ignore_need_weights: bool = False) -> MHAPatchReport:
    """Route the ``nn.MultiheadAttention`` calls of ``model`` that the fused op expresses exactly to it, in place.

    ``ignore_need_weights=True`` also fuses calls with ``need_weights=True`` (torch's default) and returns
    ``(out, None)`` for them: opt in only when every caller discards the weights (e.g. transformers' SigLIP /
    SigLIP2 pooling heads, which take ``[0]``). Returns an :class:`MHAPatchReport`; a model without
    ``nn.MultiheadAttention`` gets an empty one. Idempotent: patched modules are left alone.
    """
    if not isinstance(ignore_need_weights, bool):
        raise TypeError(f"patch_multihead_attention: ignore_need_weights must be a bool, got {ignore_need_weights!r}")
    dispatch.fused_ops()  # ImportError now, saying why, rather than at the first call
    report = MHAPatchReport()
    for name, module in model.named_modules(remove_duplicate=True):
        if not isinstance(module, nn.MultiheadAttention):
            continue
        why = _why_not(module)
        if why is not None:
            report.skipped[name] = why
            continue
        setattr(module, _ORIG, module.forward)
        setattr(module, _IGNORE_NEED_WEIGHTS, ignore_need_weights)
        # A partial of a module-level function, not a bound method: a pickled model (torch.save(model)) then
        # loads back patched; a bound method pickles as getattr(module, "_fast_forward"), which fails.
        module.forward = functools.partial(_fast_forward, module)
        report.patched.append(name)
    return report


def unpatch_multihead_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_multihead_attention`: every module's class forward shows through again."""
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and hasattr(module, _ORIG):
            del module.forward  # the instance attribute
            for attr in (_ORIG, _IGNORE_NEED_WEIGHTS):
                delattr(module, attr)
    return model
