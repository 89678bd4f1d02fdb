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
layer_norm_eps   1e-6
attention        "fused"   "fused" | "eager"
===============  ========  ====================================================

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

from perceiver_fast.layers import dispatch
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
        dispatch.check_attention(attention)
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

