"""Weight conversion from transformers' Perceiver image classifiers to :class:`PerceiverIO`."""
from __future__ import annotations

import torch


def _copy_linear(sd: dict, prefix: str, linear) -> None:
    sd[prefix + ".weight"] = linear.weight.detach()
    if linear.bias is not None:
        sd[prefix + ".bias"] = linear.bias.detach()


def _cross_layer(sd: dict, prefix: str, layer) -> None:
    """HF PerceiverLayer (cross) -> CrossAttentionLayer."""
    att = layer.attention.self
    _copy_linear(sd, prefix + ".attn.norm_q", att.layernorm1)
    _copy_linear(sd, prefix + ".attn.norm_kv", att.layernorm2)
    _copy_linear(sd, prefix + ".attn.to_q", att.query)
    _copy_linear(sd, prefix + ".attn.to_k", att.key)
    _copy_linear(sd, prefix + ".attn.to_v", att.value)
    _copy_linear(sd, prefix + ".attn.to_out", layer.attention.output.dense)
    _copy_linear(sd, prefix + ".norm_mlp", layer.layernorm)
    _copy_linear(sd, prefix + ".mlp.fc1", layer.mlp.dense1)
    _copy_linear(sd, prefix + ".mlp.fc2", layer.mlp.dense2)


def _self_layer(sd: dict, prefix: str, layer) -> None:
    """HF PerceiverLayer (self) -> SelfAttentionBlock with the q/k/v weights packed."""
    att = layer.attention.self
    _copy_linear(sd, prefix + ".norm", att.layernorm1)
    sd[prefix + ".qkv.weight"] = torch.cat([att.query.weight, att.key.weight, att.value.weight]).detach()
    sd[prefix + ".qkv.bias"] = torch.cat([att.query.bias, att.key.bias, att.value.bias]).detach()
    _copy_linear(sd, prefix + ".proj", layer.attention.output.dense)
    _copy_linear(sd, prefix + ".norm_mlp", layer.layernorm)
    _copy_linear(sd, prefix + ".mlp.fc1", layer.mlp.dense1)
    _copy_linear(sd, prefix + ".mlp.fc2", layer.mlp.dense2)


def config_kwargs(config) -> dict:
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


def perceiver_io_from_hf(cls, hf_model, *, attention: str = "fused", fold="auto"):
    perceiver = getattr(hf_model, "perceiver", hf_model)
    config = perceiver.config
    prep = perceiver.input_preprocessor
    decoder = perceiver.decoder
    if prep is None or getattr(prep, "prep_type", None) not in ("conv1x1", "pixels", "conv"):
        raise ValueError("from_hf converts PerceiverForImageClassification{Learned,Fourier,ConvProcessing} "
                         "(an image preprocessor of prep_type conv1x1, pixels or conv)")
    if decoder is None or not hasattr(decoder, "decoder") or not hasattr(decoder.decoder, "decoding_cross_attention"):
        raise ValueError("from_hf needs a PerceiverClassificationDecoder")
    if config.hidden_act != "gelu":
        raise ValueError(f"only hidden_act='gelu' (exact GELU, as our MLP) is supported, got {config.hidden_act!r}")
    if config.cross_attention_shape_for_attention != "kv" and config.qk_channels is None:
        raise ValueError("only cross_attention_shape_for_attention='kv' (HF's default) is supported")
    if prep.spatial_downsample not in (1, 4) or (prep.prep_type != "conv" and prep.spatial_downsample != 1):
        raise ValueError("only HF's image-classification preprocessors (no extra downsampling) are supported")
    kind = {"conv1x1": "learned", "pixels": "fourier", "conv": "conv"}[prep.prep_type]
    kwargs = dict(
        config_kwargs(config), in_channels=prep.in_channels, preprocessing=kind,
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
    model = cls(**kwargs)
    ref = next(iter(hf_model.parameters()))
    model.to(device=ref.device, dtype=ref.dtype)  # before loading: load_state_dict keeps our dtype
    model.load_state_dict(hf_state_dict(perceiver, kind), strict=True)
    model.train(hf_model.training)
    return model


def hf_state_dict(perceiver, kind: str) -> dict:
    """Our PerceiverIO state_dict from an HF PerceiverModel (``kind``: learned | fourier | conv)."""
    prep = perceiver.input_preprocessor
    decoder = perceiver.decoder

    sd = {"latents": perceiver.embeddings.latents.detach()}
    if kind == "learned":
        _copy_linear(sd, "preprocessor.conv", prep.convnet_1x1)
        sd["preprocessor.pos.position_embeddings"] = prep.position_embeddings.position_embeddings.detach()
        _copy_linear(sd, "preprocessor.pos_proj", prep.positions_projection)
    elif kind == "conv":
        for key, value in prep.convnet.conv.state_dict().items():
            sd["preprocessor.convnet.conv." + key] = value
        for key, value in prep.convnet.batchnorm.state_dict().items():
            sd["preprocessor.convnet.batchnorm." + key] = value
    enc = perceiver.encoder
    _cross_layer(sd, "cross_attention", enc.cross_attention)
    for i, layer in enumerate(enc.self_attends):
        _self_layer(sd, f"self_attends.{i}", layer)
    dec = decoder.decoder
    sd["decoder.query.position_embeddings"] = dec.output_position_encodings.position_embeddings.detach()
    _cross_layer(sd, "decoder.cross", dec.decoding_cross_attention)
    _copy_linear(sd, "decoder.head", dec.final_layer)
    return sd
