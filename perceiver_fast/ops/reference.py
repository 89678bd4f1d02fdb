"""Eager PyTorch versions of every op in the package.

They serve three purposes and are kept deliberately plain:

* the oracle of the tests (called on float64 copies of the inputs);
* the ``attention="eager"`` path of the layers and models;
* the "eager" baseline of the benchmarks (matmul, softmax, matmul; and HF's
  CPU construction of Fourier features followed by ``torch.cat``).

All attention tensors use the (batch, seq, heads, head_dim) layout.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from perceiver_fast.ops.fourier import check_fourier_args, fourier_features_eager


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    training: bool = True,
    causal: bool = False,
    softcap: float = 0.0,
) -> torch.Tensor:
    """softmax(cap(q k^T * scale) + mask) v, materialising the full score matrix.

    q: (Bq, N, H, Dqk) with Bq in {1, B}; k: (B, M, Hkv, Dqk); v: (B, M, Hkv, Dv), Hkv dividing H (grouped-query
    heads: query head h reads key/value head h // (H // Hkv)).
    key_padding_mask: bool (B, M), True = attend. ``causal``: query i attends key j only if
    j <= i + M - N (aligned bottom-right, FlashAttention 2's convention). ``softcap`` > 0 caps the scaled
    scores as ``softcap * tanh(s / softcap)``. Queries whose keys are all masked get zeros (not NaN).
    Returns (B, N, H, Dv) in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    H, Hkv = q.shape[2], k.shape[2]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
    qh = q.transpose(1, 2)  # (Bq, H, N, D)
    kh = k.transpose(1, 2)
    vh = v.transpose(1, 2)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, H, N, M)
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    keep = attention_keep_mask(key_padding_mask, causal, q.shape[1], k.shape[1], q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    # In the input dtype, as eager PyTorch and HF do: float64 stays an exact
    # oracle, and the benchmark's eager baseline holds no float32 copy.
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        # A fully masked row is NaN after softmax; define it as zeros.
        probs = probs.masked_fill(~keep, 0.0)
    if dropout_p > 0.0 and training:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, vh)  # (B, H, N, Dv)
    return out.transpose(1, 2)


def attention_keep_mask(key_padding_mask: Optional[torch.Tensor], causal: bool, n: int, m: int,
                        device=None) -> Optional[torch.Tensor]:
    """The bool (B|1, 1, N, M) mask of attended (query, key) pairs, or None when every pair is attended.

    Key padding (True = attend) and, with ``causal``, j <= i + M - N (bottom-right aligned)."""
    keep = None
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]
    if causal:
        rows = torch.arange(n, device=device)[:, None] + (m - n)
        tri = (torch.arange(m, device=device)[None, :] <= rows)[None, None]
        keep = tri if keep is None else keep & tri
    return keep


def fourier_features_reference(
    index_dims: Sequence[int],
    num_bands: int,
    *,
    max_resolution: Optional[Sequence[float]] = None,
    concat_pos: bool = True,
    sine_only: bool = False,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """HF transformers' build_linear_positions + generate_fourier_features.

    Returns (prod(index_dims), C) with channels
    [positions (if concat_pos) | sin(pi f x) axis by axis | cos(...) same order],
    computed in ``dtype`` throughout, exactly as HF does in float32. The checks
    and the formula are the encoder module's (never its kernels).
    """
    index_dims, max_resolution = check_fourier_args(index_dims, num_bands, max_resolution)
    return fourier_features_eager(index_dims, num_bands, max_resolution, concat_pos, sine_only, dtype, device)


def fourier_encode_reference(
    inputs: torch.Tensor,
    num_bands: int,
    *,
    max_resolution: Optional[Sequence[float]] = None,
    concat_pos: bool = True,
    sine_only: bool = False,
) -> torch.Tensor:
    """[inputs flattened | features] for channels-last inputs (B, *index_dims, Cin).

    This is HF's eager recipe: build the features, expand over the batch and
    torch.cat them onto the flattened inputs.
    """
    index_dims = inputs.shape[1:-1]
    feats = fourier_features_reference(
        index_dims,
        num_bands,
        max_resolution=max_resolution,
        concat_pos=concat_pos,
        sine_only=sine_only,
        dtype=torch.float32,
        device=inputs.device,
    ).to(inputs.dtype)
    flat = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    return torch.cat([flat, feats.expand(inputs.shape[0], -1, -1)], dim=-1)
