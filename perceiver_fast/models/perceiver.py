"""The keras-example Perceiver (keras.io "Image classification with Perceiver", CIFAR-100).

``Perceiver(**kwargs)`` - keyword arguments (defaults = the keras example):

=================  =========  ==========================================================
image_size         64         int or (H, W)
patch_size         2          patch side; image_size must be divisible by it
in_channels        3
num_classes        100
num_latents        256        latent array length (keras latent_dim)
latent_dim         256        channels of patches and latents (keras projection_dim)
cross_heads        1          cross-attention heads
self_heads         8          self-attention heads
dim_head           None       self-attention head width; default latent_dim // self_heads
depth              4          transformer blocks per iteration (keras num_transformer_blocks)
num_iterations     2          cross-attention + transformer repeats, weights shared
mlp_ratio          1          FFN width factor (keras ffn_units = [D, D])
dropout            0.0        attention-probability dropout
mlp_dropout        0.0        FFN dropout
layer_norm_eps     1e-6       (keras)
attention          "fused"    "fused" | "eager"
fold               "auto"     projection folding of the cross-attention
input_group        None       process group the patches are sharded over (see below)
=================  =========  ==========================================================

``input_group=group`` (``attention="fused"``): every rank gets the same images
but embeds only its contiguous slice of the patches (the patch projection and
the position table rows of those patches) and attends to it with
:func:`perceiver_fast.distributed.sharded_cross_attention`; the latents and the
transformer are replicated, every rank returns the same logits and ends the
backward with the same, complete gradients.

Structure: patches -> Linear + learned position embedding (the data array);
a learned latent array (batch-shared); ``num_iterations`` x [cross-attention
(latents <- data, HF PerceiverLayer semantics) -> ``depth`` pre-LN self-attention
blocks], all weights shared across iterations; LayerNorm, global average
pooling over the latents, Linear classifier. (Unlike keras, the cross-attention
has an output projection and the residual uses the un-normalised latents, as in
the Perceiver IO layer.)

Digits-sized: ``Perceiver(image_size=8, patch_size=2, in_channels=1, num_classes=10,
num_latents=8, latent_dim=32, self_heads=4, depth=2)``.
``forward(images (B, C, H, W)) -> logits (B, num_classes)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from perceiver_fast import distributed
from perceiver_fast.layers import dispatch
from perceiver_fast.layers.checks import check_int
from perceiver_fast.layers.attention import CrossAttentionLayer, FoldMode, SelfAttentionBlock
from perceiver_fast.layers.embeddings import PatchEmbedding, TrainablePositionEncoding, check_image
from perceiver_fast.models.hub import HUB_TAGS, HubMixin


class Perceiver(nn.Module, HubMixin, library_name="perceiver_fast", tags=HUB_TAGS):
    def __init__(self, *, image_size=64, patch_size=2, in_channels: int = 3, num_classes: int = 100,
                 num_latents: int = 256, latent_dim: int = 256, cross_heads: int = 1, self_heads: int = 8,
                 dim_head: Optional[int] = None, depth: int = 4, num_iterations: int = 2, mlp_ratio: int = 1,
                 dropout: float = 0.0, mlp_dropout: float = 0.0, layer_norm_eps: float = 1e-6,
                 attention: str = "fused", fold: FoldMode = "auto", input_group=None):
        super().__init__()
        dispatch.check_attention(attention)
        self.num_iterations = check_int("num_iterations", num_iterations)
        self.input_group = input_group
        check_int("depth", depth, minimum=0)
        check_int("num_latents", num_latents)
        check_int("latent_dim", latent_dim)
        check_int("num_classes", num_classes)
        self.patch_embed = PatchEmbedding(image_size, patch_size, in_channels, latent_dim)
        self.pos_embed = TrainablePositionEncoding(self.patch_embed.num_patches, latent_dim)
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim) * 0.02)
        self.cross_attention = CrossAttentionLayer(
            latent_dim, latent_dim, heads=cross_heads, widening_factor=mlp_ratio, dropout=dropout,
            mlp_dropout=mlp_dropout, layer_norm_eps=layer_norm_eps, attention=attention, fold=fold,
            input_group=input_group)
        self.transformer = nn.ModuleList(
            SelfAttentionBlock(latent_dim, heads=self_heads, dim_head=dim_head, mlp_ratio=mlp_ratio,
                               dropout=dropout, mlp_dropout=mlp_dropout, layer_norm_eps=layer_norm_eps,
                               attention=attention)
            for _ in range(depth))
        self.norm = nn.LayerNorm(latent_dim, eps=layer_norm_eps)
        self.head = nn.Linear(latent_dim, num_classes)

    def input_bounds(self) -> tuple:
        """[start, end) of the patches this rank holds: all of them without ``input_group``."""
        group = self.input_group
        return distributed.shard_bounds(self.patch_embed.num_patches, distributed.group_size(group),
                                        distributed.group_rank(group))

    def local_data(self, images: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the embedded patches (B, P_r, latent_dim), computed for those patches only."""
        group = self.input_group
        if group is None:
            return self.patch_embed(images) + self.pos_embed()
        pe = self.patch_embed
        check_image(images, pe.in_channels, pe.image_size)
        start, end = self.input_bounds()
        (gh, gw), (ph, pw) = pe.grid, pe.patch_size
        b, c = images.shape[:2]
        patches = images.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
        g = lambda t: None if t is None else distributed.all_reduce_grad(t, group)  # noqa: E731
        data = F.linear(patches[:, start:end], g(pe.proj.weight).flatten(1), g(pe.proj.bias))
        return data + g(self.pos_embed.position_embeddings)[start:end]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        data = self.local_data(images)
        z = self.latents.unsqueeze(0)  # (1, N, D): batch-shared in the first cross-attention
        for _ in range(self.num_iterations):
            z = self.cross_attention(z, data)
            for block in self.transformer:
                z = block(z)
        return self.head(self.norm(z).mean(dim=1))
