"""In-place acceleration of transformers Perceiver models.

``patch_hf_perceiver(model, attention="fused", fold="auto", fourier=True)``
patches a ``PerceiverModel`` / ``PerceiverFor*`` in place and returns it:

* every ``PerceiverSelfAttention`` (encoder cross-attention, latent
  self-attention, decoder cross-attention) runs through the fused ops, with
  projection folding for the cross-attentions (``fold`` as in
  :class:`perceiver_fast.layers.CrossAttention`); batch-expanded latents
  (HF's ``latents.expand(B, ...)``) are detected by their zero batch stride and
  normalised / projected once, then passed with batch 1 (never expanded);
* every ``PerceiverFourierPositionEncoding`` builds its features on the
  model's device with our encoder instead of HF's CPU construction, and image
  preprocessors with concatenated Fourier features write
  ``[inputs | features]`` in one fused call.

Weights, parameter names and ``state_dict`` are untouched (the module classes are
swapped for subclasses). Calls with ``output_attentions=True`` (or a mask the
fused path cannot express) fall back to HF's own code. ``unpatch_hf_perceiver``
restores the original classes.
"""
from __future__ import annotations

from typing import Optional

import torch

from perceiver_fast.layers import _dispatch
from perceiver_fast.layers.attention import FoldMode, check_fold, choose_folding, cross_attend
from perceiver_fast.ops import fourier

_ORIG = "_perceiver_fast_original_class"


def _hf():
    try:
        from transformers.models.perceiver import modeling_perceiver
    except ImportError as exc:  # pragma: no cover
        raise ImportError("patch_hf_perceiver needs transformers installed") from exc
    return modeling_perceiver


def _key_padding_mask(mask: Optional[torch.Tensor], batch: int, m: int):
    """HF's additive (B, 1, N, M) float mask (0 = attend) or a (B, M) 0/1 mask -> bool (B, M), or "fallback"."""
    if mask is None:
        return None
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            return "fallback"
        row = mask[:, 0, 0, :]
        if mask.shape[2] > 1 and not torch.compiler.is_compiling():
            if not bool((mask[:, 0] == row[:, None, :]).all()):
                return "fallback"  # the mask differs between queries: not a key padding mask
        keep = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    elif mask.dim() == 2:
        keep = mask if mask.dtype == torch.bool else mask != 0
    else:
        return "fallback"
    if keep.shape != (batch, m):
        keep = keep.expand(batch, m)
    return keep


def _make_attention_class(base):
    class FastPerceiverSelfAttention(base):
        """HF PerceiverSelfAttention on perceiver_fast's fused ops (same parameters)."""

        def forward(self, hidden_states, attention_mask=None, inputs=None, inputs_mask=None,
                    output_attentions=False, **kwargs):
            is_cross = inputs is not None
            mask = inputs_mask if is_cross else attention_mask
            kv_len = inputs.shape[1] if is_cross else hidden_states.shape[1]
            batch = (inputs if is_cross else hidden_states).shape[0]
            kpm = _key_padding_mask(mask, batch, kv_len)
            if output_attentions or isinstance(kpm, str) or (kpm is not None and not is_cross):
                return super().forward(hidden_states, attention_mask, inputs, inputs_mask, output_attentions)
            h = self.num_heads
            dh = self.qk_channels_per_head
            p = self.dropout.p if self.training else 0.0
            if is_cross:
                q_in = hidden_states
                if q_in.shape[0] > 1 and q_in.stride(0) == 0:
                    q_in = q_in[:1]  # batch-shared latents: normalise and project once, pass Bq=1
                qh = self.query(self.layernorm1(q_in))
                qh = qh.view(q_in.shape[0], q_in.shape[1], h, dh)
                x = self.layernorm2(inputs)
                fold = choose_folding(self._pf_fold, q_in.shape[1], kv_len, x.shape[-1], self.qk_channels,
                                      self.v_channels, h)
                out = cross_attend(qh, x, self.key, self.value, attention=self._pf_attention, key_padding_mask=kpm,
                                   dropout_p=p, fold=fold)
                if out.shape[0] != batch:
                    out = out.expand(batch, -1, -1)
                return (out,)
            x = self.layernorm1(hidden_states)
            b, n, _ = x.shape
            q = self.query(x).view(b, n, h, dh)
            k = self.key(x).view(b, n, h, dh)
            v = self.value(x).view(b, n, h, self.v_channels_per_head)
            out = _dispatch.self_attention(q, k, v, attention=self._pf_attention, dropout_p=p,
                                           softmax_scale=dh ** -0.5)
            return (out.reshape(b, n, self.v_channels),)

    FastPerceiverSelfAttention.__name__ = "Fast" + base.__name__
    return FastPerceiverSelfAttention


def _make_fourier_class(base):
    class FastPerceiverFourierPositionEncoding(base):
        """Fourier features built on the requested device by perceiver_fast's encoder."""

        def forward(self, index_dims, batch_size, device, dtype, pos=None):
            if pos is not None:
                return super().forward(index_dims, batch_size, device, dtype, pos)
            feats = fourier.fourier_features(tuple(int(d) for d in index_dims), self.num_bands,
                                               max_resolution=self.max_resolution, concat_pos=self.concat_pos,
                                               sine_only=self.sine_only, dtype=dtype, device=device)
            return feats.expand(batch_size, -1, -1)

    FastPerceiverFourierPositionEncoding.__name__ = "Fast" + base.__name__
    return FastPerceiverFourierPositionEncoding


def _make_image_prep_class(base):
    class FastPerceiverImagePreprocessor(base):
        """Fused [inputs | Fourier features] write for concatenated Fourier position encodings."""

        def _build_network_inputs(self, inputs, network_input_is_1d=True, interpolate_pos_encoding=False):
            enc = self.position_embeddings
            if (self.position_encoding_type != "fourier" or self.concat_or_add_pos != "concat"
                    or not network_input_is_1d or self.project_pos_dim > 0 or inputs.dim() < 3):
                return super()._build_network_inputs(inputs, network_input_is_1d, interpolate_pos_encoding)
            if tuple(inputs.shape[1:-1]) and len(enc.max_resolution) != inputs.dim() - 2:
                return super()._build_network_inputs(inputs, network_input_is_1d, interpolate_pos_encoding)
            out = fourier.fourier_encode(inputs, enc.num_bands, max_resolution=enc.max_resolution,
                                           concat_pos=enc.concat_pos, sine_only=enc.sine_only)
            return out, inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])

    FastPerceiverImagePreprocessor.__name__ = "Fast" + base.__name__
    return FastPerceiverImagePreprocessor


_CLASS_CACHE: dict = {}


def _swap(module, maker):
    base = type(module)
    if hasattr(module, _ORIG):
        return
    key = (maker, base)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = maker(base)
    setattr(module, _ORIG, base)
    module.__class__ = _CLASS_CACHE[key]


def patch_hf_perceiver(model, *, attention: str = "fused", fold: FoldMode = "auto", fourier: bool = True):
    """Swap the attention (and Fourier features) of a transformers Perceiver model in place; returns it."""
    mp = _hf()
    _dispatch.check_attention(attention)
    check_fold(fold)
    n_att = 0
    for module in model.modules():
        if isinstance(module, mp.PerceiverSelfAttention):
            _swap(module, _make_attention_class)
            module._pf_attention = attention
            module._pf_fold = fold
            n_att += 1
        elif fourier and isinstance(module, mp.PerceiverFourierPositionEncoding):
            _swap(module, _make_fourier_class)
        elif fourier and isinstance(module, mp.PerceiverImagePreprocessor):
            _swap(module, _make_image_prep_class)
    if n_att == 0:
        raise ValueError(f"no transformers PerceiverSelfAttention found in {type(model).__name__}; "
                         "patch_hf_perceiver expects a PerceiverModel or PerceiverFor* model")
    return model


def unpatch_hf_perceiver(model):
    """Undo :func:`patch_hf_perceiver` (restores the original module classes)."""
    for module in model.modules():
        if hasattr(module, _ORIG):
            module.__class__ = getattr(module, _ORIG)
            delattr(module, _ORIG)
            for name in ("_pf_attention", "_pf_fold"):
                if hasattr(module, name):
                    delattr(module, name)
    return model
