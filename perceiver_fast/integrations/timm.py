"""In-place acceleration of timm Vision Transformers.

``patch_timm_vit(model, attention="fused")`` replaces the forward of every
timm ``Attention``-like module (attributes ``qkv`` (Linear dim -> 3*H*D),
``num_heads``, ``head_dim``, ``scale``, ``q_norm``, ``k_norm``, ``attn_drop``,
``proj``, ``proj_drop``, optionally ``norm``; no parameters of its own) with the fused self-attention:
the qkv output is viewed as (B, N, 3, H, D) and its strided q/k/v views go
straight to :func:`perceiver_fast.ops.attention.self_attention` (no permute,
no copy). Weights and state_dict are untouched. Calls with an ``attn_mask``
fall back to timm's own forward. ``unpatch_timm_vit`` restores it. timm
itself is not imported: any module with that structure is patched.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from perceiver_fast.layers import _dispatch

_ATTRS = ("qkv", "num_heads", "proj", "attn_drop", "proj_drop")
_ORIG = "_perceiver_fast_original_forward"


def is_timm_attention(module: nn.Module) -> bool:
    """timm's Attention structure, holding no parameters of its own: look-alikes that do (BEiT/EVA's q/v
    biases outside the qkv Linear, relative position tables) use them in a forward this patch would replace."""
    return (all(hasattr(module, a) for a in _ATTRS) and isinstance(getattr(module, "qkv"), nn.Linear)
            and next(module.parameters(recurse=False), None) is None)


def _fast_forward(self, x: torch.Tensor, attn_mask=None, **kwargs):
    if attn_mask is not None or kwargs:
        return getattr(self, _ORIG)(x, attn_mask=attn_mask, **kwargs)
    b, n, _ = x.shape
    h = self.num_heads
    d = getattr(self, "head_dim", self.qkv.out_features // (3 * h))
    qkv = self.qkv(x).view(b, n, 3, h, d)
    q, k, v = qkv.unbind(2)  # (B, N, H, D) strided views
    q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
    if q_norm is not None and not isinstance(q_norm, nn.Identity):
        q = q_norm(q)
    if k_norm is not None and not isinstance(k_norm, nn.Identity):
        k = k_norm(k)
    p = self.attn_drop.p if (self.training and isinstance(self.attn_drop, nn.Dropout)) else 0.0
    scale = getattr(self, "scale", d ** -0.5)
    o = _dispatch.self_attention(q, k, v, attention=self._pf_attention, dropout_p=p, softmax_scale=scale)
    o = o.reshape(b, n, h * d)
    norm = getattr(self, "norm", None)
    if norm is not None:
        o = norm(o)
    return self.proj_drop(self.proj(o))


def patch_timm_vit(model: nn.Module, *, attention: str = "fused") -> nn.Module:
    """Swap the attention of a timm VisionTransformer (or any module tree with timm Attention blocks) in place."""
    _dispatch.check_attention(attention)
    count = 0
    for module in model.modules():
        if not is_timm_attention(module):
            continue
        if not hasattr(module, _ORIG):
            setattr(module, _ORIG, module.forward)
            module.forward = types.MethodType(_fast_forward, module)
        module._pf_attention = attention
        count += 1
    if count == 0:
        raise ValueError(f"no timm Attention module (qkv, num_heads, proj, attn_drop, proj_drop) found in "
                         f"{type(model).__name__}")
    return model


def unpatch_timm_vit(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if hasattr(module, _ORIG):
            del module.forward  # the instance attribute; the class forward shows through again
            delattr(module, _ORIG)
            delattr(module, "_pf_attention")
    return model
