"""perceiver_fast as a transformers 5 attention implementation.

``register_hf_attention(name="perceiver_fast")`` registers :func:`hf_attention_forward` with transformers'
``AttentionInterface`` and :func:`hf_attention_mask` with its ``AttentionMaskInterface``. Afterwards
``from_pretrained(..., attn_implementation=name)``, ``_from_config(config, attn_implementation=name)`` and
``model.set_attn_implementation(name)`` run :func:`perceiver_fast.cross_attention` in every model that routes
its attention through the interface (ViT, BERT, ...). transformers' Perceiver does not use the interface:
see :func:`perceiver_fast.integrations.patch_hf_perceiver`.

The contract: the attention function gets q/k/v as (B, H, S, D) (a transpose is a free view into the op's
(B, S, H, D) layout), ``scaling`` and ``dropout``, and returns ((B, S, H, D), None). The mask function turns
a bidirectional 2-D padding mask into the (B, KV) bool key-padding mask the op takes. Everything the op cannot
express runs transformers' sdpa with the same arguments (and the mask sdpa would have got): causal, sliding
window or custom 4-D masks, ``is_causal``, grouped-query heads, paged caches, softcapping / sinks /
position biases, ``output_attentions``, and dtypes or head dims the op does not take. Queries whose keys are
all padded get the op's zeros; sdpa returns the same.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from perceiver_fast.layers import dispatch

DEFAULT_NAME = "perceiver_fast"
# Substrings that make transformers treat an implementation name as its own (hub kernels, sdpa, flash, flex)
_RESERVED = ("/", "sdpa", "flash_attention", "flex_attention", "paged|", "eager")
# Keyword arguments that ask for something the op cannot do when they are set (not None / False)
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "cache",
                       "sliding_window", "cu_seq_lens_q", "cu_seq_lens_k")


def _transformers():
    try:
        from transformers import masking_utils, modeling_utils
        from transformers.integrations import sdpa_attention
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("register_hf_attention needs transformers >= 5 installed") from exc
    return masking_utils, modeling_utils, sdpa_attention


def hf_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                      mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """transformers mask function: a (B, KV) bool key-padding mask (True = attend) or None for a plain
    bidirectional mask; for any other pattern (causal, sliding window, packed sequences, ``or``/``and``
    masks) the 4-D mask transformers' sdpa would get, which :func:`hf_attention_forward` hands to sdpa."""
    masking_utils, _, _ = _transformers()
    plain = (mask_function is masking_utils.bidirectional_mask_function and kv_offset == 0
             and (attention_mask is None or (attention_mask.dim() == 2 and attention_mask.dtype == torch.bool
                                             and attention_mask.shape[-1] == kv_length)))
    if not plain:
        if mask_function is None:
            mask_function = masking_utils.causal_mask_function  # sdpa_mask's own default
        return masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                       q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                                       attention_mask=attention_mask, **kwargs)
    if attention_mask is None:
        return None
    return attention_mask.expand(batch_size, kv_length)


def _fused_can_take(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], is_causal: Optional[bool], kwargs: dict) -> bool:
    if any(kwargs.get(name) not in (None, False) for name in _UNSUPPORTED_KWARGS):
        return False
    if attention_mask is not None and not (attention_mask.dim() == 2 and attention_mask.dtype == torch.bool):
        return False  # a 4-D mask: causal / sliding / custom, or the user's own
    # sdpa's rule: without a mask a causal module (is_causal defaults to True) attends causally
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and query.shape[2] > 1:
        return False
    b, h = key.shape[0], key.shape[1]
    ops = dispatch.fused_ops()
    return (query.shape[1] == h and value.shape[1] == h and query.shape[0] in (1, b)
            and query.dtype in dispatch.FUSED_ATTENTION_DTYPES
            and max(query.shape[-1], value.shape[-1]) <= ops.MAX_HEAD_DIM
            and query.dtype == key.dtype == value.dtype)


def hf_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                         scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                         **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """transformers attention function: q (B|1, H, N, D), k (B, H, M, D), v (B, H, M, Dv) -> ((B, N, H, Dv), None).

    ``attention_mask`` is what :func:`hf_attention_mask` made (a (B, M) bool key-padding mask or None) or a
    4-D mask; calls the op cannot express exactly run transformers' sdpa with the same arguments.
    """
    if not _fused_can_take(module, query, key, value, attention_mask, is_causal, kwargs):
        _, _, sdpa_attention = _transformers()
        return sdpa_attention.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                                     scaling=scaling, is_causal=is_causal, **kwargs)
    out = dispatch.cross_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    attention="fused", key_padding_mask=attention_mask, dropout_p=float(dropout),
                                    softmax_scale=scaling)
    return out, None


def register_hf_attention(name: str = DEFAULT_NAME) -> str:
    """Register perceiver_fast with transformers as ``attn_implementation=name``; idempotent. Returns ``name``.

    Registers :func:`hf_attention_forward` (``AttentionInterface``) and :func:`hf_attention_mask`
    (``AttentionMaskInterface``; without a mask function transformers would drop the padding mask).
    """
    if not isinstance(name, str) or not name or any(word in name for word in _RESERVED):
        raise ValueError(f"register_hf_attention: name must be a plain non-empty string without any of "
                         f"{list(_RESERVED)} (transformers handles those itself), got {name!r}")
    masking_utils, modeling_utils, _ = _transformers()
    modeling_utils.AttentionInterface.register(name, hf_attention_forward)
    masking_utils.AttentionMaskInterface.register(name, hf_attention_mask)
    return name
