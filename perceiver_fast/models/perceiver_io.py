"""Perceiver IO for image classification (HF ``PerceiverForImageClassification{Learned,Fourier,ConvProcessing}``).

``PerceiverIO(**kwargs)`` - keyword arguments (defaults = deepmind/vision-perceiver-learned):

=============================  ==========  ===============================================
image_size                     224         int or (H, W); inputs must have this size
in_channels                    3           image channels
num_classes                    1000        decoder outputs
preprocessing                  "learned"   "learned" | "fourier" | "conv" (HF's 3 image preprocessors)
num_latents                    512         latent array length
latent_dim                     1024        latent channels (HF d_latents)
num_blocks                     8           times the self-attention block is applied (shared weights)
num_self_attends_per_block     6           self-attention layers per block
self_heads                     8           self-attention heads
cross_heads                    1           encoder cross-attention heads
decoder_heads                  1           decoder cross-attention heads
cross_widening_factor          1           MLP width factor of the cross-attention layers
use_query_residual             True        encoder cross-attention adds the latents back (HF's config flag)
self_widening_factor           1           MLP width factor of the self-attention layers
qk_channels, v_channels        None        HF defaults (cross: kv_dim; self: latent_dim)
prep_channels                  None        conv width: 256 (learned) / 64 (conv)
pos_channels                   256         trainable position width ("learned")
num_bands                      64          Fourier bands ("fourier", "conv")
max_resolution                 None        Fourier max resolution; default the input grid
dropout                        0.0         attention-probability dropout
layer_norm_eps                 1e-5
attention                      "fused"     "fused" | "eager"
fold                           "auto"      projection folding of the cross-attentions ("auto" | True | False)
input_group                    None        process group the inputs are sharded over (see below)
=============================  ==========  ===============================================

Inputs sharded across ranks (``input_group=group``, ``attention="fused"``): every
rank gets the same images, but preprocesses and attends only its contiguous
slice of the M input positions (:func:`perceiver_fast.distributed.shard_bounds`):
the pixels / conv1x1 features, the Fourier features or position table rows
of those positions, the LayerNorm and K/V side of the encoder cross-attention
(:func:`perceiver_fast.distributed.sharded_cross_attention`). The latents, the
latent transformer and the decoder are replicated; every rank returns the same
logits and ends the backward with the same, complete gradients. The "conv"
preprocessing runs its conv stem on the whole image on every rank (a 7x7 conv
needs its neighbours) and slices its output. ``key_padding_mask`` is the full
(B, M) mask on every rank.

Presets: ``PerceiverIO.from_config("learned" | "fourier" | "conv", **overrides)``
match deepmind/vision-perceiver-{learned,fourier,conv} (the fourier preset uses
max_resolution (224, 224), the conv preset (56, 56)). Conversion from other libraries'
models lives in :mod:`perceiver_fast.integrations`.

A small digits-sized model: ``PerceiverIO(image_size=8, in_channels=1, num_classes=10,
preprocessing="fourier", num_latents=16, latent_dim=64, num_blocks=2,
num_self_attends_per_block=2, self_heads=4, num_bands=4)``.

``forward(images (B, C, H, W), key_padding_mask=None) -> logits (B, num_classes)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from perceiver_fast import distributed
from perceiver_fast.layers import dispatch
from perceiver_fast.layers.attention import CrossAttentionLayer, FoldMode, SelfAttentionBlock
from perceiver_fast.layers.checks import check_float, check_int
from perceiver_fast.layers.decoders import ClassificationDecoder
from perceiver_fast.layers.embeddings import check_image
from perceiver_fast.layers.preprocessors import ImagePreprocessor
from perceiver_fast.models.hub import HUB_TAGS, HubMixin

PRESETS = {
    "learned": dict(preprocessing="learned"),
    "fourier": dict(preprocessing="fourier", max_resolution=(224, 224)),
    "conv": dict(preprocessing="conv", max_resolution=(56, 56)),
}


class PerceiverIO(nn.Module, HubMixin, library_name="perceiver_fast", tags=HUB_TAGS):
    def __init__(self, *, image_size=224, in_channels: int = 3, num_classes: int = 1000,
                 preprocessing: str = "learned", num_latents: int = 512, latent_dim: int = 1024,
                 num_blocks: int = 8, num_self_attends_per_block: int = 6, self_heads: int = 8,
                 cross_heads: int = 1, decoder_heads: int = 1, cross_widening_factor: int = 1,
                 self_widening_factor: int = 1, use_query_residual: bool = True, qk_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, prep_channels: Optional[int] = None, pos_channels: int = 256,
                 num_bands: int = 64, max_resolution=None, dropout: float = 0.0, layer_norm_eps: float = 1e-5,
                 attention: str = "fused", fold: FoldMode = "auto", input_group=None):
        super().__init__()
        dispatch.check_attention(attention)
        for name, value in (("num_latents", num_latents), ("latent_dim", latent_dim), ("num_blocks", num_blocks),
                            ("num_self_attends_per_block", num_self_attends_per_block), ("self_heads", self_heads),
                            ("cross_heads", cross_heads), ("decoder_heads", decoder_heads),
                            ("num_classes", num_classes)):
            check_int(name, value)
        check_float("dropout", dropout, 0.0, 1.0, include_maximum=False)
        if latent_dim % self_heads != 0:
            raise ValueError(f"latent_dim ({latent_dim}) must be divisible by self_heads ({self_heads})")
        if latent_dim % cross_heads != 0:
            raise ValueError(f"latent_dim ({latent_dim}) must be divisible by cross_heads ({cross_heads})")
        self_inner = latent_dim if qk_channels is None else int(qk_channels)
        if (v_channels if v_channels is not None else self_inner) != self_inner:
            raise ValueError("the packed self-attention needs v_channels == qk_channels")
        if self_inner % self_heads != 0:
            raise ValueError(f"qk_channels ({self_inner}) must be divisible by self_heads ({self_heads})")
        self.num_blocks = int(num_blocks)
        self.attention = attention
        self.input_group = input_group
        self.preprocessor = ImagePreprocessor(preprocessing, image_size=image_size, in_channels=in_channels,
                                              out_channels=prep_channels, pos_channels=pos_channels,
                                              num_bands=num_bands, max_resolution=max_resolution)
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim) * 0.02)
        self.cross_attention = CrossAttentionLayer(
            latent_dim, self.preprocessor.num_channels, heads=cross_heads, qk_channels=qk_channels,
            v_channels=v_channels, widening_factor=cross_widening_factor, use_query_residual=use_query_residual,
            dropout=dropout,
            layer_norm_eps=layer_norm_eps, attention=attention, fold=fold, input_group=input_group)
        self.self_attends = nn.ModuleList(
            SelfAttentionBlock(latent_dim, heads=self_heads, dim_head=self_inner // self_heads,
                               mlp_ratio=self_widening_factor, dropout=dropout, layer_norm_eps=layer_norm_eps,
                               attention=attention)
            for _ in range(num_self_attends_per_block))
        self.decoder = ClassificationDecoder(latent_dim, num_classes, heads=decoder_heads, dropout=dropout,
                                             layer_norm_eps=layer_norm_eps, attention=attention, fold=fold)

    @classmethod
    def from_config(cls, name: str, **overrides) -> "PerceiverIO":
        """deepmind/vision-perceiver-{learned,fourier,conv} architecture (random init), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def input_bounds(self) -> tuple:
        """[start, end) of the input positions this rank holds: all of them without ``input_group``."""
        group = self.input_group
        return distributed.shard_bounds(self.preprocessor.num_inputs, distributed.group_size(group),
                                        distributed.group_rank(group))

    def local_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the preprocessed inputs (B, M_r, C), computed for those positions only."""
        pre, group = self.preprocessor, self.input_group
        if group is None:
            return pre(images)
        check_image(images, pre.in_channels, pre.image_size)
        start, end = self.input_bounds()
        g = lambda t: None if t is None else distributed.all_reduce_grad(t, group)  # noqa: E731
        if pre.kind == "learned":
            pixels = images.flatten(2).transpose(1, 2)[:, start:end]  # (B, M_r, C)
            feats = F.linear(pixels, g(pre.conv.weight).flatten(1), g(pre.conv.bias))
            table = g(pre.pos.position_embeddings)[start:end]
            pos = F.linear(table, g(pre.pos_proj.weight), g(pre.pos_proj.bias)).to(feats.dtype)
            return torch.cat([feats, pos.expand(images.shape[0], -1, -1)], dim=-1)
        x = images
        if pre.kind == "conv":
            # The 7x7 stem needs neighbouring pixels: computed whole on every rank, its gradient summed.
            x = distributed.all_reduce_grad(pre.convnet(images), group)
        pixels = x.flatten(2).transpose(1, 2)[:, start:end]
        feats = fourier_features_rows(pre.grid, pre.num_bands, pre.max_resolution, start, end, x.device)
        return torch.cat([pixels, feats.to(pixels.dtype).expand(pixels.shape[0], -1, -1)], dim=-1)

    def encode(self, images: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images -> latents (B, num_latents, latent_dim)."""
        inputs = self.local_inputs(images)
        if self.input_group is not None and key_padding_mask is not None:
            start, end = self.input_bounds()
            key_padding_mask = key_padding_mask[:, start:end]
        z = self.cross_attention(self.latents.unsqueeze(0), inputs, key_padding_mask)  # latents batch-shared
        for _ in range(self.num_blocks):
            for layer in self.self_attends:
                z = layer(z)
        return z

    def forward(self, images: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.decoder(self.encode(images, key_padding_mask))


def fourier_features_rows(index_dims, num_bands: int, max_resolution, start: int, end: int,
                          device=None) -> torch.Tensor:
    """Rows [start, end) of the (prod(index_dims), C) Fourier features of a grid, in float32.

    The same recipe as :func:`perceiver_fast.ops.fourier.fourier_features` (HF's
    build_linear_positions + generate_fourier_features, positions concatenated,
    sin then cos), computed for those flat positions only.
    """
    idx = torch.arange(start, end, device=device)
    coords = torch.unravel_index(idx, tuple(index_dims))
    pos = torch.stack([torch.linspace(-1.0, 1.0, steps=n, device=device)[c] for n, c in zip(index_dims, coords)],
                      dim=-1)  # (M_r, D)
    freqs = torch.stack([torch.linspace(1.0, r / 2, steps=num_bands, device=device) for r in max_resolution])
    per_pos = (pos[:, :, None] * freqs[None]).reshape(pos.shape[0], -1)
    return torch.cat([pos, torch.sin(math.pi * per_pos), torch.cos(math.pi * per_pos)], dim=-1)
