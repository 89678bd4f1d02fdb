"""Trainable position encodings and patch embeddings."""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import nn

from perceiver_fast.layers.checks import check_int, check_size_pair


class TrainablePositionEncoding(nn.Module):
    """A learned (prod(index_dims), num_channels) table, HF ``PerceiverTrainablePositionEncoding``.

    ``forward()`` returns the (P, C) table itself (no batch copy: broadcast it,
    or concatenate with ``expand``). ``init_std`` is the normal init std
    (HF's ``initializer_range``, 0.02).
    """

    def __init__(self, index_dims: Union[int, Sequence[int]], num_channels: int, *, init_std: float = 0.02):
        super().__init__()
        dims = (int(index_dims),) if isinstance(index_dims, int) else tuple(int(d) for d in index_dims)
        if not dims or any(d <= 0 for d in dims) or num_channels <= 0:
            raise ValueError(f"index_dims {index_dims} and num_channels {num_channels} must be positive")
        self.index_dims = dims
        self.num_channels = int(num_channels)
        self.position_embeddings = nn.Parameter(torch.randn(math.prod(dims), num_channels) * init_std)

    def output_size(self) -> int:
        return self.num_channels

    def forward(self) -> torch.Tensor:
        return self.position_embeddings


class PatchEmbedding(nn.Module):
    """Non-overlapping patches -> linear projection (a strided conv): (B, C, H, W) -> (B, P, dim).

    Args: image_size (int or (H, W)), patch_size (int or pair), in_channels, dim, bias.
    """

    def __init__(self, image_size=224, patch_size=16, in_channels: int = 3, dim: int = 768, *, bias: bool = True):
        super().__init__()
        self.image_size = check_size_pair("image_size", image_size)
        self.patch_size = check_size_pair("patch_size", patch_size)
        check_int("in_channels", in_channels)
        check_int("dim", dim)
        for s, p in zip(self.image_size, self.patch_size):
            if s % p != 0:
                raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        self.grid = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.num_patches = self.grid[0] * self.grid[1]
        self.in_channels = int(in_channels)
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.in_channels, self.image_size)
        return self.proj(x).flatten(2).transpose(1, 2)


def check_image(x: torch.Tensor, in_channels: int, image_size) -> None:
    """Raise a clear error when x is not a (B, in_channels, H, W) batch of the configured size."""
    if x.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"expected {in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if image_size is not None and tuple(x.shape[2:]) != tuple(image_size):
        raise ValueError(f"expected images of size {tuple(image_size)}, got {tuple(x.shape[2:])}")
