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

The patched model returns what HF returns: a mask that is not HF's own
0 / finfo.min padding mask (soft additive biases, masks that differ between
queries), dtypes the fused ops do not take (float64), and ``output_attentions``
run HF's code for that call; samples whose inputs are all padded get HF's
uniform softmax (the mean of V), recomputed for those samples only.

``register_hf_perceiver_patch(attention=..., fold=..., fourier=...)`` is the
load-time option: Perceivers built by ``from_pretrained`` / ``from_config``
afterwards come patched (transformers' ``register_patch_mapping``).
"""
from __future__ import annotations

from typing import Optional

import torch

from perceiver_fast.layers import dispatch
from perceiver_fast.layers.attention import FoldMode, check_fold, choose_folding, cross_attend
from perceiver_fast.ops import fourier

_ORIG = "_perceiver_fast_original_class"


def _hf():
    try:
        from transformers.models.perceiver import modeling_perceiver
    except ImportError as exc:  # pragma: no cover
        raise ImportError("patch_hf_perceiver needs transformers installed") from exc
    return modeling_perceiver


class _Fallback:
    """Marker: this call needs HF's own code (a mask the fused path cannot express exactly)."""


FALLBACK = _Fallback()


def _check_or_assert(ok: torch.Tensor, why: str) -> bool:
    """``ok.all()`` in eager mode; under torch.compile an async assert (no graph break), so a mask the fused
    path cannot express fails loudly there instead of giving another answer than HF's."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok.all(), why)
        return True
    return bool(ok.all())


def hf_key_padding_mask(mask: Optional[torch.Tensor], batch: int, m: int):
    """HF's additive (B, 1, N, M) float mask -> (keep (B, M) bool, dead (B,) bool), None, or :data:`FALLBACK`.

    ``keep`` is True where a key is attended; ``dead`` marks samples whose keys are all masked, for which HF's
    softmax is uniform over all keys (see :func:`_uniform_rows`). The mask must say "attend" (exactly 0) or
    "masked" (at most ``finfo.min / 2``, which the scores cannot outweigh), be the same for every query and,
    in a fully masked sample, hold one finite value; anything else (soft biases such as -30 or -1e4, bool
    masks, which HF would add as 0/1) is :data:`FALLBACK`.
    """
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1 or not mask.is_floating_point():
        return FALLBACK
    row = mask[:, 0, 0, :]
    masked = row <= torch.finfo(row.dtype).min / 2
    if mask.shape[2] > 1 and not _check_or_assert(mask[:, 0] == row[:, None, :], "mask differs between queries"):
        return FALLBACK  # not a key padding mask
    if not _check_or_assert((row == 0) | masked, "soft additive mask values"):
        return FALLBACK
    keep = ~masked
    dead = ~keep.any(-1)
    uniform = (row == row[:, :1]) & torch.isfinite(row)
    if not _check_or_assert(~dead[:, None] | uniform, "fully masked sample with unequal or infinite mask values"):
        return FALLBACK
    return keep.expand(batch, m), dead.expand(batch)


def _uniform_rows(out: torch.Tensor, x: torch.Tensor, value: torch.nn.Linear, dead: torch.Tensor) -> torch.Tensor:
    """HF's answer for fully masked samples: every score plus finfo.min rounds to finfo.min, so the softmax is
    uniform and the output is the mean of V, value(mean of x). The fused op returns zeros there (its
    documented rule); only those samples are recomputed."""
    if torch.compiler.is_compiling():  # no data-dependent indexing in a graph
        mean = value(x.mean(1)).unsqueeze(1).to(out.dtype)
        return torch.where(dead[:, None, None], mean, out)
    idx = dead.nonzero().flatten()
    if idx.numel() == 0:
        return out
    mean = value(x[idx].mean(1)).unsqueeze(1).to(out.dtype)
    return out.index_put((idx,), mean.expand(-1, out.shape[1], -1))  # out of place: the op saved ``out``


def _make_attention_class(base):
    class FastPerceiverSelfAttention(base):
        """HF PerceiverSelfAttention on perceiver_fast's fused ops (same parameters)."""

        _pf_attention = "fused"  # class defaults: the load-time patch builds instances without patch_hf_perceiver
        _pf_fold = "auto"

        def forward(self, hidden_states, attention_mask=None, inputs=None, inputs_mask=None,
                    output_attentions=False, **kwargs):
            is_cross = inputs is not None
            mask = inputs_mask if is_cross else attention_mask
            kv_len = inputs.shape[1] if is_cross else hidden_states.shape[1]
            batch = (inputs if is_cross else hidden_states).shape[0]
            p = self.dropout.p if self.training else 0.0
            kpm = hf_key_padding_mask(mask, batch, kv_len)
            if (output_attentions or kpm is FALLBACK or (kpm is not None and not is_cross)
                    or not dispatch.fused_attention_takes(self._pf_attention, hidden_states.dtype)):
                return super().forward(hidden_states, attention_mask, inputs, inputs_mask, output_attentions)
            keep, dead = kpm if kpm is not None else (None, None)
            if dead is not None and p > 0 and not torch.compiler.is_compiling() and bool(dead.any()):
                # HF drops out the uniform probabilities of a fully masked sample too
                return super().forward(hidden_states, attention_mask, inputs, inputs_mask, output_attentions)
            h = self.num_heads
            dh = self.qk_channels_per_head
            if is_cross:
                q_in = hidden_states
                if q_in.shape[0] > 1 and q_in.stride(0) == 0:
                    q_in = q_in[:1]  # batch-shared latents: normalise and project once, pass Bq=1
                qh = self.query(self.layernorm1(q_in))
                qh = qh.view(q_in.shape[0], q_in.shape[1], h, dh)
                x = self.layernorm2(inputs)
                fold = choose_folding(self._pf_fold, q_in.shape[1], kv_len, x.shape[-1], self.qk_channels,
                                      self.v_channels, h)
                out = cross_attend(qh, x, self.key, self.value, attention=self._pf_attention, key_padding_mask=keep,
                                   dropout_p=p, fold=fold)
                if out.shape[0] != batch:
                    out = out.expand(batch, -1, -1)
                if dead is not None:
                    out = _uniform_rows(out, x, self.value, dead)
                return (out,)
            x = self.layernorm1(hidden_states)
            b, n, _ = x.shape
            q = self.query(x).view(b, n, h, dh)
            k = self.key(x).view(b, n, h, dh)
            v = self.value(x).view(b, n, h, self.v_channels_per_head)
            out = dispatch.self_attention(q, k, v, attention=self._pf_attention, dropout_p=p,
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
_FAST = "_perceiver_fast_class"  # class marker: already one of our subclasses (in place or load-time patch)


def _fast_class(maker, base) -> type:
    key = (maker, base)
    if key not in _CLASS_CACHE:
        cls = maker(base)
        setattr(cls, _FAST, True)
        _CLASS_CACHE[key] = cls
    return _CLASS_CACHE[key]


def _swap(module, maker):
    base = type(module)
    if hasattr(module, _ORIG) or getattr(base, _FAST, False):
        return
    setattr(module, _ORIG, base)
    module.__class__ = _fast_class(maker, base)


def patch_hf_perceiver(model, *, attention: str = "fused", fold: FoldMode = "auto", fourier: bool = True):
    """Swap the attention (and Fourier features) of a transformers Perceiver model in place; returns it."""
    mp = _hf()
    dispatch.check_attention(attention)
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


_PATCHED_CLASSES = {
    "PerceiverSelfAttention": _make_attention_class,
    "PerceiverFourierPositionEncoding": _make_fourier_class,
    "PerceiverImagePreprocessor": _make_image_prep_class,
}


def register_hf_perceiver_patch(*, attention: str = "fused", fold: FoldMode = "auto", fourier: bool = True) -> None:
    """Load-time variant of :func:`patch_hf_perceiver`, for models built through transformers.

    Registers our subclasses with transformers' ``register_patch_mapping``, so that every Perceiver built by
    ``from_pretrained``, ``from_config`` or ``_from_config`` (transformers' ``apply_patches``) afterwards is
    born patched. Models built by calling the class directly are not: patch those with
    :func:`patch_hf_perceiver`. Calling it again replaces the options; :func:`unregister_hf_perceiver_patch`
    undoes it.
    """
    mp = _hf()
    try:
        from transformers.monkey_patching import register_patch_mapping
    except ImportError as exc:  # pragma: no cover - transformers < 5.x
        raise ImportError("register_hf_perceiver_patch needs transformers' monkey_patching (transformers >= 5); "
                          "use patch_hf_perceiver on the built model instead") from exc
    dispatch.check_attention(attention)
    check_fold(fold)
    names = list(_PATCHED_CLASSES) if fourier else ["PerceiverSelfAttention"]
    mapping = {}
    for name in names:
        base = getattr(mp, name)
        while getattr(base, _FAST, False):  # registered before and applied right now: patch the original
            base = base.__mro__[1]
        cls = _fast_class(_PATCHED_CLASSES[name], base)
        if name == "PerceiverSelfAttention":
            cls = type(cls.__name__, (cls,), {"_pf_attention": attention, "_pf_fold": fold})
        mapping[name] = cls
    unregister_hf_perceiver_patch()
    register_patch_mapping(mapping)


def unregister_hf_perceiver_patch() -> None:
    """Undo :func:`register_hf_perceiver_patch` (models built afterwards are HF's own again)."""
    from transformers.monkey_patching import get_patch_mapping, unregister_patch_mapping

    ours = [name for name, cls in get_patch_mapping().items()
            if name in _PATCHED_CLASSES and getattr(cls, _FAST, False)]
    if ours:
        unregister_patch_mapping(ours)
