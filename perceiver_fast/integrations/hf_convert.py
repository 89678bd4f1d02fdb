"""Weight conversion from transformers' Perceiver image classifiers to :class:`PerceiverIO`.

* :func:`perceiver_io_from_hf` - a ``PerceiverForImageClassification{Learned,Fourier,ConvProcessing}``
  converted to a :class:`~perceiver_fast.models.PerceiverIO` with the same weights;
* :func:`perceiver_io_from_hf_config` - the architecture of a ``PerceiverConfig``, random init;
* :func:`hf_state_dict` / :func:`hf_cross_layer_state_dict` - the state dicts of our model / our
  :class:`~perceiver_fast.layers.CrossAttentionLayer` from HF's modules.

transformers itself is not imported: the functions read the HF modules' attributes.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from perceiver_fast.layers.attention import FoldMode
from perceiver_fast.models.perceiver_io import PRESETS, PerceiverIO

StateDict = Dict[str, torch.Tensor]


def _linear(prefix: str, linear: nn.Module) -> StateDict:
    sd = {prefix + ".weight": linear.weight.detach()}
    if linear.bias is not None:
        sd[prefix + ".bias"] = linear.bias.detach()
    return sd


def _prefixed(prefix: str, sd: StateDict) -> StateDict:
    return {f"{prefix}.{k}": v for k, v in sd.items()}


def _mlp_state_dict(layer: nn.Module) -> StateDict:
    return {**_linear("norm_mlp", layer.layernorm), **_linear("mlp.fc1", layer.mlp.dense1),
            **_linear("mlp.fc2", layer.mlp.dense2)}


def hf_cross_layer_state_dict(hf_layer: nn.Module) -> StateDict:
    """The state dict of our ``CrossAttentionLayer`` holding the weights of an HF cross ``PerceiverLayer``."""
    att = hf_layer.attention.self
    return {**_linear("attn.norm_q", att.layernorm1), **_linear("attn.norm_kv", att.layernorm2),
            **_linear("attn.to_q", att.query), **_linear("attn.to_k", att.key), **_linear("attn.to_v", att.value),
            **_linear("attn.to_out", hf_layer.attention.output.dense), **_mlp_state_dict(hf_layer)}


def _self_layer_state_dict(hf_layer: nn.Module) -> StateDict:
    """HF self-attention PerceiverLayer -> our SelfAttentionBlock (the q/k/v weights packed into one qkv)."""
    att = hf_layer.attention.self
    return {**_linear("norm", att.layernorm1),
            "qkv.weight": torch.cat([att.query.weight, att.key.weight, att.value.weight]).detach(),
            "qkv.bias": torch.cat([att.query.bias, att.key.bias, att.value.bias]).detach(),
            **_linear("proj", hf_layer.attention.output.dense), **_mlp_state_dict(hf_layer)}


def _config_kwargs(config) -> dict:
    """PerceiverIO keyword arguments for what a transformers ``PerceiverConfig`` says about the architecture."""
    return dict(
        image_size=config.image_size, num_classes=config.num_labels, num_latents=config.num_latents,
        latent_dim=config.d_latents, num_blocks=config.num_blocks,
        num_self_attends_per_block=config.num_self_attends_per_block,
        self_heads=config.num_self_attention_heads, cross_heads=config.num_cross_attention_heads,
        cross_widening_factor=config.cross_attention_widening_factor,
        self_widening_factor=config.self_attention_widening_factor,
        use_query_residual=config.use_query_residual,
        qk_channels=config.qk_channels, v_channels=config.v_channels,
        dropout=config.attention_probs_dropout_prob,
    )


def perceiver_io_from_hf_config(config, preprocessing: str = "learned", **overrides) -> PerceiverIO:
    """Random-init :class:`PerceiverIO` with the architecture of a transformers ``PerceiverConfig``.

    Maps num_latents, d_latents, num_blocks, num_self_attends_per_block, num_self_attention_heads,
    num_cross_attention_heads, *_widening_factor, use_query_residual, qk/v_channels,
    attention_probs_dropout_prob, image_size and num_labels; the preprocessing's HF defaults (Fourier
    max_resolution 224 or 56) apply unless overridden. No weights are copied.
    """
    kwargs = dict(PRESETS.get(preprocessing, dict(preprocessing=preprocessing)))
    kwargs.update(_config_kwargs(config))
    kwargs.update(overrides)
    return PerceiverIO(**kwargs)


_PREP_KINDS = {"conv1x1": "learned", "pixels": "fourier", "conv": "conv"}


def perceiver_io_from_hf(hf_model: nn.Module, *, attention: str = "fused", fold: FoldMode = "auto") -> PerceiverIO:
    """Convert a transformers ``PerceiverForImageClassification{Learned,Fourier,ConvProcessing}`` (or its
    ``PerceiverModel``) to a :class:`PerceiverIO` with the same weights, device, dtype and train/eval mode."""
    perceiver = getattr(hf_model, "perceiver", hf_model)
    config = perceiver.config
    prep = perceiver.input_preprocessor
    decoder = perceiver.decoder
    if prep is None or getattr(prep, "prep_type", None) not in _PREP_KINDS:
        raise ValueError("perceiver_io_from_hf converts PerceiverForImageClassification{Learned,Fourier,"
                         "ConvProcessing} (an image preprocessor of prep_type conv1x1, pixels or conv), got "
                         f"{type(hf_model).__name__}")
    if decoder is None or not hasattr(decoder, "decoder") or not hasattr(decoder.decoder, "decoding_cross_attention"):
        raise ValueError("perceiver_io_from_hf needs a PerceiverClassificationDecoder")
    if config.hidden_act != "gelu":
        raise ValueError(f"only hidden_act='gelu' (exact GELU, as our MLP) is supported, got {config.hidden_act!r}")
    if config.cross_attention_shape_for_attention != "kv" and config.qk_channels is None:
        raise ValueError("only cross_attention_shape_for_attention='kv' (HF's default) is supported")
    if prep.spatial_downsample not in (1, 4) or (prep.prep_type != "conv" and prep.spatial_downsample != 1):
        raise ValueError("only HF's image-classification preprocessors (no extra downsampling) are supported")
    kind = _PREP_KINDS[prep.prep_type]
    kwargs = dict(
        _config_kwargs(config), in_channels=prep.in_channels, preprocessing=kind,
        decoder_heads=decoder.decoder.decoding_cross_attention.attention.self.num_heads,
        attention=attention, fold=fold,
    )
    if kind == "learned":
        kwargs.update(prep_channels=prep.out_channels, pos_channels=prep.position_embeddings.output_size())
    else:
        enc = prep.position_embeddings
        if not enc.concat_pos or enc.sine_only:
            raise ValueError("only concat_pos=True, sine_only=False Fourier features are supported")
        kwargs.update(num_bands=enc.num_bands, max_resolution=tuple(enc.max_resolution))
        if kind == "conv":
            kwargs.update(prep_channels=prep.out_channels)
    model = PerceiverIO(**kwargs)
    ref = next(iter(hf_model.parameters()))
    model.to(device=ref.device, dtype=ref.dtype)  # before loading: load_state_dict keeps our dtype
    model.load_state_dict(hf_state_dict(perceiver, kind), strict=True)
    model.train(hf_model.training)
    return model


def hf_state_dict(perceiver: nn.Module, kind: str) -> StateDict:
    """Our PerceiverIO state_dict from an HF ``PerceiverModel`` (``kind``: learned | fourier | conv)."""
    if kind not in PRESETS:
        raise ValueError(f"kind must be one of {sorted(PRESETS)}, got {kind!r}")
    prep = perceiver.input_preprocessor
    sd: StateDict = {"latents": perceiver.embeddings.latents.detach()}
    if kind == "learned":
        sd.update(_linear("preprocessor.conv", prep.convnet_1x1))
        sd["preprocessor.pos.position_embeddings"] = prep.position_embeddings.position_embeddings.detach()
        sd.update(_linear("preprocessor.pos_proj", prep.positions_projection))
    elif kind == "conv":
        sd.update(_prefixed("preprocessor.convnet.conv", prep.convnet.conv.state_dict()))
        sd.update(_prefixed("preprocessor.convnet.batchnorm", prep.convnet.batchnorm.state_dict()))
    enc = perceiver.encoder
    sd.update(_prefixed("cross_attention", hf_cross_layer_state_dict(enc.cross_attention)))
    for i, layer in enumerate(enc.self_attends):
        sd.update(_prefixed(f"self_attends.{i}", _self_layer_state_dict(layer)))
    dec = perceiver.decoder.decoder
    sd["decoder.query.position_embeddings"] = dec.output_position_encodings.position_embeddings.detach()
    sd.update(_prefixed("decoder.cross", hf_cross_layer_state_dict(dec.decoding_cross_attention)))
    sd.update(_linear("decoder.head", dec.final_layer))
    return sd
