"""HF's three image preprocessors for Perceiver IO, producing the cross-attention inputs (B, M, C).

* ``ImagePreprocessor(kind="learned")``: conv1x1 -> ``out_channels`` plus a
  trainable position table projected by a Linear, concatenated (HF
  ``prep_type="conv1x1"``, ``position_encoding_type="trainable"``,
  ``project_pos_dim=256``).
* ``kind="fourier"``: raw pixels plus Fourier features (HF ``prep_type="pixels"``),
  fused ``[pixels | features]`` write by the Fourier encoder, built on the
  input's device.
* ``kind="conv"``: 7x7/2 conv (same padding, no bias) + BatchNorm + ReLU +
  3x3/2 max-pool, plus Fourier features (HF ``prep_type="conv"``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from perceiver_fast.layers.checks import check_int, check_size_pair
from perceiver_fast.layers.embeddings import TrainablePositionEncoding, check_image
from perceiver_fast.ops.fourier import fourier_channels, fourier_encode

PREPROCESSING = ("learned", "fourier", "conv")


class Conv2dSamePadding(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (HF ``Conv2dSamePadding``: pads k//2-1+(k odd) / k//2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for k in self.kernel_size[::-1]:
            pads += [k // 2 + (k - 2 * (k // 2)) - 1, k // 2]
        return self._conv_forward(F.pad(x, pads), self.weight, self.bias)


class Conv2DDownsample(nn.Module):
    """4x spatial downsampling: conv 7x7/2 (same), BatchNorm, ReLU, max-pool 3x3/2 (HF ``Conv2DDownsample``)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, use_batchnorm: bool = True):
        super().__init__()
        self.conv = Conv2dSamePadding(in_channels, out_channels, kernel_size=7, stride=2, bias=False)
        self.batchnorm = nn.BatchNorm2d(out_channels) if use_batchnorm else nn.Identity()
        self.max_pool = nn.MaxPool2d(kernel_size=3, stride=2)

    @staticmethod
    def output_size(size: int) -> int:
        after_conv = -(-size // 2)
        return (after_conv - 3) // 2 + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.max_pool(F.relu(self.batchnorm(self.conv(x))))


class ImagePreprocessor(nn.Module):
    """Images (B, C, H, W) -> Perceiver IO inputs (B, M, num_channels).

    Args:
        kind: "learned" | "fourier" | "conv".
        image_size: int or (H, W); inputs must have this size.
        in_channels: image channels.
        out_channels: conv width for "learned" (default 256) and "conv" (default 64).
        pos_channels: trainable position width for "learned" (default 256, projected by a Linear).
        num_bands: Fourier bands (default 64).
        max_resolution: Fourier max resolution; default the index grid (HF uses
            (224, 224) for pixels and (56, 56) for conv at 224x224).
        use_batchnorm: BatchNorm in the conv stem.
    """

    def __init__(self, kind: str = "fourier", *, image_size=224, in_channels: int = 3,
                 out_channels: Optional[int] = None, pos_channels: int = 256, num_bands: int = 64,
                 max_resolution: Optional[Sequence[float]] = None, use_batchnorm: bool = True):
        super().__init__()
        if kind not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {kind!r}")
        self.kind = kind
        self.image_size = check_size_pair("image_size", image_size)
        self.in_channels = check_int("in_channels", in_channels)
        self.num_bands = check_int("num_bands", num_bands)
        check_int("pos_channels", pos_channels)
        if out_channels is not None:
            check_int("out_channels", out_channels)
        if kind == "learned":
            out_channels = 256 if out_channels is None else int(out_channels)
            self.grid = self.image_size
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
            self.pos = TrainablePositionEncoding(self.grid[0] * self.grid[1], pos_channels)
            self.pos_proj = nn.Linear(pos_channels, pos_channels)
            self.num_channels = out_channels + pos_channels
        else:
            if kind == "conv":
                out_channels = 64 if out_channels is None else int(out_channels)
                self.convnet = Conv2DDownsample(in_channels, out_channels, use_batchnorm)
                self.grid = tuple(Conv2DDownsample.output_size(s) for s in self.image_size)
                if min(self.grid) < 1:
                    raise ValueError(f"image_size {self.image_size} is too small for the conv stem (needs >= 5)")
                cin = out_channels
            else:
                cin = self.in_channels
                self.grid = self.image_size
            self.max_resolution = tuple(self.grid if max_resolution is None else max_resolution)
            if len(self.max_resolution) != 2:
                raise ValueError(f"max_resolution must have 2 entries for images, got {self.max_resolution}")
            self.num_channels = cin + fourier_channels(2, self.num_bands)
        self.out_channels = out_channels
        self.num_inputs = self.grid[0] * self.grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.in_channels, self.image_size)
        if self.kind == "learned":
            feats = self.conv(x).flatten(2).transpose(1, 2)  # (B, P, out)
            pos = self.pos_proj(self.pos()).to(feats.dtype)
            return torch.cat([feats, pos.expand(x.shape[0], -1, -1)], dim=-1)
        if self.kind == "conv":
            x = self.convnet(x)
        return fourier_encode(x.permute(0, 2, 3, 1), self.num_bands, max_resolution=self.max_resolution)
