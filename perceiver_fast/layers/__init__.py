"""nn.Module layers built on the fused ops.

Every layer with attention takes ``attention="fused" | "eager"``.

* :class:`CrossAttention`, :class:`CrossAttentionLayer` - HF PerceiverLayer
  cross-attention semantics, with projection folding (``fold="auto"|True|False``).
* :class:`SelfAttentionBlock` - pre-LN block with a packed qkv projection.
* :class:`MLP`.
* :class:`TrainablePositionEncoding`, :class:`PatchEmbedding`,
  :class:`FourierPositionEncoding` (from :mod:`perceiver_fast.layers.position`).
* :class:`ImagePreprocessor` (``kind="learned"|"fourier"|"conv"``),
  :class:`Conv2DDownsample`.
* :class:`ClassificationDecoder`.
"""
from perceiver_fast.layers.attention import (  # noqa: F401
    MLP,
    CrossAttention,
    CrossAttentionLayer,
    SelfAttentionBlock,
    folding_flops,
)
from perceiver_fast.layers.decoders import ClassificationDecoder  # noqa: F401
from perceiver_fast.layers.embeddings import PatchEmbedding, TrainablePositionEncoding  # noqa: F401
from perceiver_fast.layers.preprocessors import Conv2DDownsample, ImagePreprocessor  # noqa: F401

__all__ = [
    "MLP",
    "CrossAttention",
    "CrossAttentionLayer",
    "SelfAttentionBlock",
    "folding_flops",
    "ClassificationDecoder",
    "PatchEmbedding",
    "TrainablePositionEncoding",
    "Conv2DDownsample",
    "ImagePreprocessor",
    "FourierPositionEncoding",
]


def __getattr__(name):
    # position.py belongs to the Fourier-encoder work and may need the C++ extension: import lazily.
    if name == "FourierPositionEncoding":
        from perceiver_fast.layers.position import FourierPositionEncoding

        return FourierPositionEncoding
    raise AttributeError(f"module 'perceiver_fast.layers' has no attribute {name!r}")
