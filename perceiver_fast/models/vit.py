"""Vision Transformer (ViT) on the fused self-attention.

``ViT(**kwargs)`` - keyword arguments (defaults = ViT-B/16):

===============  ========  ====================================================
image_size       224       int or (H, W)
patch_size       16        image_size must be divisible by it
in_channels      3
num_classes      1000      0 -> no head (returns features)
dim              768
depth            12
heads            12
dim_head         None      default dim // heads
mlp_ratio        4.0
qkv_bias         True
dropout          0.0       MLP / projection dropout
attn_dropout     0.0       attention-probability dropout
emb_dropout      0.0       dropout after adding the position embedding
pool             "cls"     "cls" | "mean"
layer_norm_eps   1e-6      (timm)
attention        "fused"   "fused" | "eager"
===============  ========  ====================================================

``ViT.from_timm(timm_vit)`` converts a timm VisionTransformer (same weights).

Patch embedding (strided conv), cls token, learned position embedding, pre-LN
encoder (:class:`~perceiver_fast.layers.SelfAttentionBlock`, packed qkv), final
LayerNorm, Linear head. Digits-sized: ``ViT(image_size=8, patch_size=2,
in_channels=1, num_classes=10, dim=32, depth=2, heads=4)``.
``forward(images (B, C, H, W)) -> logits (B, num_classes)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from perceiver_fast.layers import _dispatch
from perceiver_fast.layers.attention import SelfAttentionBlock
from perceiver_fast.layers.checks import check_float, check_int
from perceiver_fast.layers.embeddings import PatchEmbedding
from perceiver_fast.models.hub import HUB_TAGS, HubMixin


class ViT(nn.Module, HubMixin, library_name="perceiver_fast", tags=HUB_TAGS):
    def __init__(self, *, image_size=224, patch_size=16, in_channels: int = 3, num_classes: int = 1000,
                 dim: int = 768, depth: int = 12, heads: int = 12, dim_head: Optional[int] = None,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, dropout: float = 0.0, attn_dropout: float = 0.0,
                 emb_dropout: float = 0.0, pool: str = "cls", layer_norm_eps: float = 1e-6,
                 attention: str = "fused"):
        super().__init__()
        _dispatch.check_attention(attention)
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        check_int("num_classes", num_classes, minimum=0)
        check_int("depth", depth, minimum=0)
        check_float("emb_dropout", emb_dropout, 0.0, 1.0, include_maximum=False)
        self.pool = pool
        self.patch_embed = PatchEmbedding(image_size, patch_size, in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, dim) * 0.02)
        self.emb_drop = nn.Dropout(emb_dropout) if emb_dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(dim, heads=heads, dim_head=dim_head, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                               dropout=attn_dropout, mlp_dropout=dropout, layer_norm_eps=layer_norm_eps,
                               attention=attention)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    @classmethod
    def from_timm(cls, model, *, attention: str = "fused") -> "ViT":
        """Convert a timm ``VisionTransformer`` (class token, token pooling, pre-norm blocks, no register
        tokens, qk-norm or layer scale) to a :class:`ViT` with the same weights and dropout rates
        (drop-path is not carried over)."""
        return _vit_from_timm(cls, model, attention)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed
        x = self.emb_drop(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(images)
        return self.head(x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1))


def _dropout_p(module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _vit_from_timm(cls, model, attention: str) -> ViT:
    def unsupported(why: str):
        return ValueError(f"ViT.from_timm: unsupported timm model ({why})")

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
    ours = cls(image_size=tuple(pe.img_size), patch_size=tuple(pe.patch_size), in_channels=pe.proj.in_channels,
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
