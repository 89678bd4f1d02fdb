"""Perceiver IO classification decoder: a trainable query cross-attending to the latents."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from perceiver_fast.layers.attention import CrossAttentionLayer, FoldMode
from perceiver_fast.layers.embeddings import TrainablePositionEncoding


class ClassificationDecoder(nn.Module):
    """HF ``PerceiverClassificationDecoder``: one trainable query (batch-shared, never expanded)
    cross-attends to the latents, then a Linear to ``num_classes``.

    Args: latent_dim, num_classes, heads (1), qk_channels / v_channels (HF
    defaults), widening_factor (1), use_query_residual (True), dropout,
    layer_norm_eps, attention, fold. ``forward(latents (B, N, latent_dim))`` ->
    logits (B, num_classes).
    """

    def __init__(self, latent_dim: int, num_classes: int, *, heads: int = 1, qk_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, widening_factor: int = 1, use_query_residual: bool = True,
                 dropout: float = 0.0, layer_norm_eps: float = 1e-5, attention: str = "fused",
                 fold: FoldMode = "auto"):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.query = TrainablePositionEncoding(1, latent_dim)
        self.cross = CrossAttentionLayer(latent_dim, latent_dim, heads=heads, qk_channels=qk_channels,
                                         v_channels=v_channels, widening_factor=widening_factor,
                                         use_query_residual=use_query_residual, dropout=dropout,
                                         layer_norm_eps=layer_norm_eps, attention=attention, fold=fold)
        self.head = nn.Linear(latent_dim, num_classes)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        q = self.query().unsqueeze(0).to(latents.dtype)  # (1, 1, C): batch-shared
        return self.head(self.cross(q, latents))[:, 0]
