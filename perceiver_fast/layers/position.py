"""Fourier-feature position encoding as an nn.Module (fused CPU/CUDA op)."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from perceiver_fast.ops.fourier import (
    check_fourier_args,
    check_fourier_input,
    encode_flat,
    fourier_channels,
    fourier_features,
)

__all__ = ["FourierPositionEncoding"]


class FourierPositionEncoding(nn.Module):
    """Perceiver Fourier position encoding of a fixed grid ``index_dims``.

    ``forward(inputs)`` takes channels-last inputs (B, *index_dims, Cin), or
    already flattened (B, prod(index_dims), Cin), and returns
    (B, prod(index_dims), Cin + output_channels) = [inputs | features] from one
    fused kernel. ``features(batch_size, device, dtype)`` gives the features
    alone (cached per (device, dtype)), like HF's
    ``PerceiverFourierPositionEncoding.forward(index_dims, batch_size, device, dtype)``.
    """

    def __init__(
        self,
        index_dims: Sequence[int],
        num_bands: int,
        *,
        max_resolution: Optional[Sequence[float]] = None,
        concat_pos: bool = True,
        sine_only: bool = False,
    ) -> None:
        super().__init__()
        self.index_dims, self.max_resolution = check_fourier_args(index_dims, num_bands, max_resolution)
        self.num_bands = int(num_bands)
        self.concat_pos = bool(concat_pos)
        self.sine_only = bool(sine_only)
        self.num_positions = math.prod(self.index_dims)
        self.output_channels = fourier_channels(len(self.index_dims), self.num_bands, self.concat_pos, self.sine_only)
        self._cache: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def num_dimensions(self) -> int:
        return len(self.index_dims)

    def output_size(self) -> int:
        """C, the number of feature channels (HF's name for it)."""
        return self.output_channels

    def features(
        self, batch_size: Optional[int] = None, device=None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """(P, C) features, or a (batch_size, P, C) expanded view; cached per (device, dtype).

        The cached tensor is shared: do not modify it in place.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        key = (device, dtype)
        feats = self._cache.get(key)
        if feats is None:
            feats = fourier_features(
                self.index_dims,
                self.num_bands,
                max_resolution=self.max_resolution,
                concat_pos=self.concat_pos,
                sine_only=self.sine_only,
                dtype=dtype,
                device=device,
            )
            self._cache[key] = feats
        if batch_size is None:
            return feats
        return feats.unsqueeze(0).expand(batch_size, -1, -1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        check_fourier_input(inputs)
        grid = tuple(inputs.shape[1:-1])
        if grid == self.index_dims:
            flat = inputs.reshape(inputs.shape[0], self.num_positions, inputs.shape[-1])
        elif inputs.dim() == 3 and inputs.shape[1] == self.num_positions:
            flat = inputs
        else:
            raise ValueError(
                f"inputs of shape {tuple(inputs.shape)} do not match index_dims {self.index_dims}: expected "
                f"(batch, *{self.index_dims}, channels) or (batch, {self.num_positions}, channels)"
            )
        return encode_flat(flat, self.index_dims, self.num_bands, self.max_resolution, self.concat_pos, self.sine_only)

    def extra_repr(self) -> str:
        return (
            f"index_dims={self.index_dims}, num_bands={self.num_bands}, max_resolution={self.max_resolution}, "
            f"concat_pos={self.concat_pos}, sine_only={self.sine_only}, output_channels={self.output_channels}"
        )
