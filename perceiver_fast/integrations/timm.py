"""In-place acceleration of timm Vision Transformers.

``patch_timm_vit(model, attention="fused")`` replaces the forward of every
timm ``Attention``-like module (attributes ``qkv`` (Linear dim -> 3*H*D),
``num_heads``, ``head_dim``, ``scale``, ``q_norm``, ``k_norm``, ``attn_drop``,
``proj``, ``proj_drop``, optionally ``norm`` and ``gate``; no parameters of its own) with the fused
self-attention:
the qkv output is viewed as (B, N, 3, H, D) and its strided q/k/v views go
straight to :func:`perceiver_fast.ops.attention.self_attention` (no permute,
no copy). Weights and state_dict are untouched. timm's blocks call
``attn(x, attn_mask=None, is_causal=False)``: those run fused; an actual mask,
``is_causal=True``, any other argument, or a dtype the fused ops do not take
(float64) run timm's own forward. ``unpatch_timm_vit`` restores it. timm
itself is not imported: any module with that structure is patched.

``vit_from_timm(timm_vit)`` converts a timm VisionTransformer to our
:class:`~perceiver_fast.models.ViT` (same weights).
"""
from __future__ import annotations

import types

import torch
from torch import nn

from perceiver_fast.layers import dispatch
from perceiver_fast.models.vit import ViT

_ATTRS = ("qkv", "num_heads", "proj", "attn_drop", "proj_drop")
_ORIG = "_perceiver_fast_original_forward"


def is_timm_attention(module: nn.Module) -> bool:
    """timm's Attention structure, holding no parameters of its own: look-alikes that do (BEiT/EVA's q/v
    biases outside the qkv Linear, relative position tables) use them in a forward this patch would replace."""
    return (all(hasattr(module, a) for a in _ATTRS) and isinstance(getattr(module, "qkv"), nn.Linear)
            and next(module.parameters(recurse=False), None) is None)


# The arguments timm's blocks pass (``self.attn(x, attn_mask=None, is_causal=False)``), in positional order,
# with the values that ask for plain self-attention; any other value runs timm's own forward.
_PLAIN_CALL = {"attn_mask": None, "is_causal": False}


def _asks_for_plain_attention(args: tuple, kwargs: dict) -> bool:
    named = dict(zip(_PLAIN_CALL, args))
    if len(args) > len(_PLAIN_CALL) or any(key in named for key in kwargs):
        return False  # more arguments than timm's, or one given twice: timm's forward reports it
    named.update(kwargs)
    return all(key in _PLAIN_CALL and value is _PLAIN_CALL[key] for key, value in named.items())


def _fast_forward(self, x: torch.Tensor, *args, **kwargs):
    if not _asks_for_plain_attention(args, kwargs) or not dispatch.fused_attention_takes(self._pf_attention, x.dtype):
        return getattr(self, _ORIG)(x, *args, **kwargs)  # masks, causal attention, float64: timm's own code
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
    o = dispatch.self_attention(q, k, v, attention=self._pf_attention, dropout_p=p, softmax_scale=scale)
    o = o.reshape(b, n, h * d)
    norm = getattr(self, "norm", None)
    if norm is not None:
        o = norm(o)
    gate = getattr(self, "gate", None)  # timm's gated attention: sigmoid(gate(x)) scales the heads' output
    if gate is not None:
        o = o * gate(x).sigmoid()
    return self.proj_drop(self.proj(o))


def patch_timm_vit(model: nn.Module, *, attention: str = "fused") -> nn.Module:
    """Swap the attention of a timm VisionTransformer (or any module tree with timm Attention blocks) in place."""
    dispatch.check_attention(attention)
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
    """Undo :func:`patch_timm_vit`: the class forward of every patched timm attention module shows through again."""
    for module in model.modules():
        if is_timm_attention(module) and hasattr(module, _ORIG) and hasattr(module, "_pf_attention"):
            del module.forward  # the instance attribute; the class forward shows through again
            delattr(module, _ORIG)
            delattr(module, "_pf_attention")
    return model


def _dropout_p(module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def vit_from_timm(model: nn.Module, *, attention: str = "fused") -> ViT:
    """Convert a timm ``VisionTransformer`` (class token, token pooling, pre-norm blocks, no register
    tokens, qk-norm or layer scale) to a :class:`~perceiver_fast.models.ViT` with the same weights, dropout
    rates, device, dtype and train/eval mode (drop-path is not carried over). Raises ``ValueError`` naming
    what it cannot convert."""

    def unsupported(why: str):
        return ValueError(f"vit_from_timm: unsupported timm model ({why})")

    if not all(hasattr(model, a) for a in ("patch_embed", "blocks", "cls_token", "pos_embed", "norm", "head")):
        raise unsupported("expected timm VisionTransformer attributes patch_embed, blocks, cls_token, pos_embed, "
                          "norm, head")
    if model.cls_token is None or getattr(model, "global_pool", "token") != "token":
        raise unsupported("needs a class token and global_pool='token'")
    if getattr(model, "num_reg_tokens", 0) or getattr(model, "no_embed_class", False):
        raise unsupported("register tokens / no_embed_class")
    for name in ("fc_norm", "norm_pre", "head_drop"):
        mod = getattr(model, name, None)
        if mod is not None and not isinstance(mod, (nn.Identity, nn.Dropout)):
            raise unsupported(f"{name} is {type(mod).__name__}")
    pe = model.patch_embed
    pe_norm = getattr(pe, "norm", None)
    if pe_norm is not None and not isinstance(pe_norm, nn.Identity):
        raise unsupported(f"patch_embed.norm is {type(pe_norm).__name__}")
    blk0 = model.blocks[0]
    for blk in model.blocks:
        kind = type(blk).__name__
        if "Post" in kind or "Parallel" in kind:  # same parameter names as Block, other maths
            raise unsupported(f"{kind} blocks; only pre-norm blocks x + attn(norm1(x)) convert")
        for name in ("ls1", "ls2", "drop_path1", "drop_path2"):
            mod = getattr(blk, name, None)
            if mod is not None and not isinstance(mod, nn.Identity) and "DropPath" not in type(mod).__name__:
                raise unsupported(f"block.{name} is {type(mod).__name__}")
        for name in ("q_norm", "k_norm", "norm"):
            mod = getattr(blk.attn, name, None)
            if mod is not None and not isinstance(mod, nn.Identity):
                raise unsupported(f"attn.{name} is {type(mod).__name__}")
    dim = model.pos_embed.shape[-1]
    head = model.head
    num_classes = head.out_features if isinstance(head, nn.Linear) else 0
    ours = ViT(image_size=tuple(pe.img_size), patch_size=tuple(pe.patch_size), in_channels=pe.proj.in_channels,
               num_classes=num_classes, dim=dim, depth=len(model.blocks), heads=blk0.attn.num_heads,
               mlp_ratio=blk0.mlp.fc1.out_features / dim, qkv_bias=blk0.attn.qkv.bias is not None,
               dropout=_dropout_p(getattr(blk0.attn, "proj_drop", None)),
               attn_dropout=_dropout_p(getattr(blk0.attn, "attn_drop", None)),
               emb_dropout=_dropout_p(getattr(model, "pos_drop", None)),
               layer_norm_eps=model.norm.eps, attention=attention)
    sd = {"cls_token": model.cls_token, "pos_embed": model.pos_embed}
    for key, value in pe.proj.state_dict().items():
        sd["patch_embed.proj." + key] = value
    names = {"norm1": "norm", "attn.qkv": "qkv", "attn.proj": "proj", "norm2": "norm_mlp", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
    for i, blk in enumerate(model.blocks):
        for key, value in blk.state_dict().items():
            prefix, leaf = key.rsplit(".", 1)
            if prefix not in names:
                raise unsupported(f"unexpected block parameter {key}")
            sd[f"blocks.{i}.{names[prefix]}.{leaf}"] = value
    for key, value in model.norm.state_dict().items():
        sd["norm." + key] = value
    if num_classes:
        for key, value in head.state_dict().items():
            sd["head." + key] = value
    ref = model.pos_embed
    ours.to(device=ref.device, dtype=ref.dtype)
    ours.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=True)
    return ours.train(model.training)
