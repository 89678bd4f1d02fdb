"""Fourier-feature position encoding (Perceiver / Perceiver IO), fused.

The features are those of HF transformers' ``generate_fourier_features`` over
``build_linear_positions`` (and DeepMind's JAX Perceiver):

* positions ``x_d = linspace(-1, 1, n_d)`` per axis, meshgrid 'ij', flattened row-major;
* frequencies ``f_{d,k} = linspace(1, max_resolution_d / 2, num_bands)``;
* channels ``[x_1..x_D (if concat_pos) | sin(pi f_{1,k} x_1) k=1..K, axis 2, ... |
  cos(...) same order (unless sine_only)]``.

The kernels (csrc/cpu, csrc/cuda) write ``[inputs | features]`` in one pass
over the output; sin/cos are computed in float64 and rounded once, positions
are exactly torch.linspace's.

This module is the one home of the encoder: argument checks
(:func:`check_fourier_args`, :func:`check_fourier_input`), the channel count
(:func:`fourier_channels`), the eager formula (:func:`fourier_features_eager`,
HF's construction, which the test oracle :mod:`perceiver_fast.ops.reference`
uses too) and the fallback: without the compiled extension,
:func:`fourier_features` and :func:`fourier_encode` compute that formula in
PyTorch on the requested device instead of failing.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch

from perceiver_fast import _extension

__all__ = [
    "fourier_features", "fourier_encode", "fourier_channels", "check_fourier_args", "check_fourier_input",
    "fused_available", "fourier_features_eager", "encode_flat",
]

MAX_INDEX_DIMS = 8  # kMaxIndexDims in csrc/fourier.h
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_OP_NAME = "fourier_encode"

try:
    _ops = _extension.load()
    _LOAD_ERROR: Optional[ImportError] = None
except ImportError as exc:  # raised again, with the build hint, at the first call
    _ops = None
    _LOAD_ERROR = exc


def fused_available() -> bool:
    """Whether the compiled extension (the fused kernels) loaded; if not, the ops use the eager formula."""
    return _LOAD_ERROR is None


def fourier_channels(num_dims: int, num_bands: int, concat_pos: bool = True, sine_only: bool = False) -> int:
    """C, the number of feature channels: D (if concat_pos) + D*K*(1 if sine_only else 2)."""
    return (num_dims if concat_pos else 0) + num_dims * num_bands * (1 if sine_only else 2)


def check_fourier_args(
    index_dims: Sequence[int], num_bands: int, max_resolution: Optional[Sequence[float]] = None
) -> Tuple[Tuple[int, ...], Tuple[float, ...]]:
    """Validates the encoder's arguments; returns (index_dims, max_resolution) as tuples."""
    if isinstance(index_dims, (torch.Size, tuple, list)):
        index_dims = tuple(index_dims)
    else:
        raise TypeError(f"index_dims must be a sequence of ints, got {type(index_dims).__name__}")
    if any(isinstance(n, bool) or not isinstance(n, numbers.Integral) for n in index_dims):
        raise TypeError(f"index_dims must be a sequence of ints, got {index_dims}")
    if isinstance(num_bands, bool) or not isinstance(num_bands, numbers.Integral):
        raise TypeError(f"num_bands must be an int, got {num_bands!r}")
    if max_resolution is not None:
        if not isinstance(max_resolution, (torch.Size, tuple, list)):
            raise TypeError(f"max_resolution must be a sequence of numbers or None, got {max_resolution!r}")
        if not all(isinstance(r, numbers.Real) and math.isfinite(r) for r in max_resolution):
            raise ValueError(f"max_resolution must be finite numbers, got {tuple(max_resolution)}")
    index_dims = tuple(int(n) for n in index_dims)
    if len(index_dims) == 0 or any(n <= 0 for n in index_dims):
        raise ValueError(f"index_dims must be a non-empty sequence of positive sizes, got {index_dims}")
    if len(index_dims) > MAX_INDEX_DIMS:
        raise ValueError(f"index_dims has {len(index_dims)} dimensions; at most {MAX_INDEX_DIMS} are supported")
    if num_bands < 1:
        raise ValueError(f"num_bands must be >= 1, got {num_bands}")
    max_resolution = index_dims if max_resolution is None else max_resolution
    if len(max_resolution) != len(index_dims):
        raise ValueError(
            f"max_resolution has {len(max_resolution)} entries but index_dims {index_dims} has "
            f"{len(index_dims)}; give one resolution per index dimension"
        )
    return index_dims, tuple(float(r) for r in max_resolution)


def check_fourier_input(inputs: torch.Tensor, name: str = "inputs") -> None:
    """TypeError unless ``inputs`` is a tensor of a supported dtype; the extension's device check."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {inputs.dtype}; the Fourier encoder supports float32, float64, float16 and bfloat16"
        )
    if fused_available():
        _extension.check_device(_OP_NAME, inputs.device)


def fourier_features_eager(
    index_dims: Tuple[int, ...],
    num_bands: int,
    max_resolution: Tuple[float, ...],
    concat_pos: bool = True,
    sine_only: bool = False,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """HF's build_linear_positions + generate_fourier_features on checked arguments, in ``dtype`` throughout.

    (prod(index_dims), C): [positions (if concat_pos) | sin(pi f x) axis by axis | cos(...) same order].
    """
    axes = [torch.linspace(-1.0, 1.0, steps=n, dtype=dtype, device=device) for n in index_dims]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(index_dims))
    freqs = torch.stack(
        [torch.linspace(1.0, r / 2, steps=num_bands, dtype=dtype, device=device) for r in max_resolution]
    )  # (D, K)
    per_pos = (pos[:, :, None] * freqs[None, :, :]).reshape(pos.shape[0], -1)  # (P, D*K)
    feats = [torch.sin(math.pi * per_pos)]
    if not sine_only:
        feats.append(torch.cos(math.pi * per_pos))
    if concat_pos:
        feats.insert(0, pos)
    return torch.cat(feats, dim=-1)


def encode_flat(
    inputs: torch.Tensor,
    index_dims: Sequence[int],
    num_bands: int,
    max_resolution: Sequence[float],
    concat_pos: bool,
    sine_only: bool,
) -> torch.Tensor:
    """The op on already-validated arguments: inputs (B, prod(index_dims), Cin) -> (B, P, Cin + C).

    The fused kernel when the extension is built; else HF's eager recipe (features in float32, cast,
    concatenated), differentiable through torch.cat.
    """
    if fused_available():
        return _ops.fourier_encode(inputs, list(index_dims), list(max_resolution), int(num_bands), bool(concat_pos),
                                   bool(sine_only))
    feats = fourier_features_eager(index_dims, num_bands, max_resolution, concat_pos, sine_only,
                                   dtype=torch.float32, device=inputs.device).to(inputs.dtype)
    return torch.cat([inputs, feats.expand(inputs.shape[0], -1, -1)], dim=-1)


def fourier_features(
    index_dims: Sequence[int],
    num_bands: int,
    *,
    max_resolution: Optional[Sequence[float]] = None,
    concat_pos: bool = True,
    sine_only: bool = False,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Fourier features of a grid: (prod(index_dims), C). max_resolution defaults to index_dims."""
    index_dims, max_resolution = check_fourier_args(index_dims, num_bands, max_resolution)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {dtype} is not supported; the Fourier encoder supports float32, float64, float16 "
                        f"and bfloat16")
    # Before allocating: on a torch or a build without CUDA, say so (and how to build), not torch's own error.
    if fused_available():
        _extension.check_device(_OP_NAME, torch.device("cpu") if device is None else torch.device(device))
    empty = torch.empty((1, math.prod(index_dims), 0), dtype=dtype, device=device)
    return encode_flat(empty, index_dims, num_bands, max_resolution, concat_pos, sine_only)[0]


def fourier_encode(
    inputs: torch.Tensor,
    num_bands: int,
    *,
    max_resolution: Optional[Sequence[float]] = None,
    concat_pos: bool = True,
    sine_only: bool = False,
) -> torch.Tensor:
    """[inputs flattened | Fourier features], written in one kernel pass.

    inputs: channels-last (B, *index_dims, Cin), Cin may be 0. Returns
    (B, prod(index_dims), Cin + C) in inputs' dtype; differentiable w.r.t. inputs.
    """
    check_fourier_input(inputs)
    if inputs.dim() < 3:
        raise ValueError(
            f"inputs must be channels-last (batch, *index_dims, channels) with at least one index dim, "
            f"got shape {tuple(inputs.shape)}"
        )
    if 0 in inputs.shape[1:-1]:
        raise ValueError(f"inputs of shape {tuple(inputs.shape)} have an empty index dim; channels-last inputs "
                         f"(batch, *index_dims, channels) need every index dim >= 1")
    index_dims, max_resolution = check_fourier_args(tuple(inputs.shape[1:-1]), num_bands, max_resolution)
    flat = inputs.reshape(inputs.shape[0], math.prod(index_dims), inputs.shape[-1])
    return encode_flat(flat, index_dims, num_bands, max_resolution, concat_pos, sine_only)


if _LOAD_ERROR is None:

    @torch.library.register_fake("perceiver_fast::fourier_encode")
    def _fourier_encode_fake(inputs, index_dims, max_resolution, num_bands, concat_pos, sine_only):
        torch._check(inputs.dim() == 3, lambda: f"inputs must be 3-D, got {inputs.dim()}-D")
        torch._check(num_bands >= 1, lambda: f"num_bands must be >= 1, got {num_bands}")
        torch._check(
            len(index_dims) >= 1 and all(n > 0 for n in index_dims),
            lambda: f"index_dims must be non-empty and positive, got {index_dims}",
        )
        torch._check(inputs.shape[1] == math.prod(index_dims), lambda: "inputs.shape[1] != prod(index_dims)")
        channels = inputs.shape[2] + fourier_channels(len(index_dims), num_bands, concat_pos, sine_only)
        return inputs.new_empty((inputs.shape[0], inputs.shape[1], channels))

    def _setup_context(ctx, inputs, output):
        ctx.in_channels = inputs[0].shape[-1]

    def _backward(ctx, grad):
        return grad[..., : ctx.in_channels], None, None, None, None, None

    torch.library.register_autograd("perceiver_fast::fourier_encode", _backward, setup_context=_setup_context)
