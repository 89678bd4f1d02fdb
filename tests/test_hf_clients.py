"""Real transformers clients of attn_implementation="perceiver_fast": tiny random configs on CPU, each model built
from the same weights as eager (the reference), perceiver_fast, and the model's own path (sdpa where the class declares
sdpa support, else eager); EVERY float output compared (fp32, max|got - want| / max|want| <= 1e-5) and the exact
number of fused calls asserted. Eager is the reference except for the batch samples where eager and sdpa disagree
with each other (query rows whose keys are all masked: eager averages all values uniformly, sdpa gives zeros) or
return different outputs (sdpa returns no attention weights): there the model's own path decides (see _compare).

The expected fused count follows the contract of hf_attention: an attention-interface call fuses when its pattern is
bidirectional (with or without key padding, self or cross), grouped-query, causal (is_causal without a mask, or the
plain bottom-right-aligned causal mask transformers builds, padded or not, decoding with a cache included), softcapped,
with dropout or with batch-shared queries; it falls back to the model's own path (sdpa where the model supports sdpa,
else its eager function) for a tensor bias kwarg (position_bias), sliding windows, packed sequences, or/and mask
patterns, custom 4-D masks, output_attentions, float64 and sinks. Each case states its expectation as a formula.

tests/hf_clients_survey.py runs the same cases with a counting wrapper around the registered attention function and
prints, per case, the attention-interface calls and what each one got.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import count_fused_calls  # noqa: E402
from perceiver_fast.integrations import register_hf_attention  # noqa: E402

NAME = register_hf_attention()
REFERENCE = "eager"
RTOL = 1e-5
LAYERS = 2
BATCH = 3


# --------------------------------------------------------------------------------------------------------- helpers


def _cls(name: str):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def _build(model_cls, config, implementation: str, state=None):
    # each model gets its own deep copy of the config: ``_from_config`` stores the implementation on the config object
    # it is given and the model keeps that very object, so two models built from one config share one
    # ``_attn_implementation`` (the last one set) and a "reference" would silently run NAME too
    model = model_cls._from_config(copy.deepcopy(config), attn_implementation=implementation).eval()
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and not missing, (missing, unexpected)
    assert model.config._attn_implementation == implementation
    return model


def _pair(model_cls, config):
    """(eager reference, the same weights with attn_implementation=NAME, the same weights on the model's own path:
    sdpa where the model class declares sdpa support, else eager), all in eval mode."""
    torch.manual_seed(0)
    ref = _build(model_cls, config, REFERENCE)
    ours = _build(model_cls, config, NAME, ref.state_dict())
    own = _build(model_cls, config, "sdpa", ref.state_dict()) if model_cls._supports_sdpa else ref
    return ref, ours, own


def _float_leaves(obj, name: str = "out") -> List[Tuple[str, torch.Tensor]]:
    """Every floating-point tensor in a model output (ModelOutput / tuple / list / dict / cache), in a fixed order."""
    if obj is None:
        return []
    if torch.is_tensor(obj):
        return [(name, obj)] if obj.is_floating_point() else []
    if hasattr(obj, "self_attention_cache") and hasattr(obj, "cross_attention_cache"):  # EncoderDecoderCache
        return (_float_leaves(obj.self_attention_cache, f"{name}.self_attention_cache")
                + _float_leaves(obj.cross_attention_cache, f"{name}.cross_attention_cache"))
    if hasattr(obj, "layers") and isinstance(getattr(obj, "layers"), (list, tuple)):  # DynamicCache & co
        leaves = []
        for i, layer in enumerate(obj.layers):
            leaves += _float_leaves(getattr(layer, "keys", None), f"{name}.layers[{i}].keys")
            leaves += _float_leaves(getattr(layer, "values", None), f"{name}.layers[{i}].values")
        return leaves
    if isinstance(obj, dict):  # ModelOutput is an OrderedDict of its non-None fields
        return [leaf for key, value in obj.items() for leaf in _float_leaves(value, f"{name}.{key}")]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, value in enumerate(obj) for leaf in _float_leaves(value, f"{name}[{i}]")]
    return []


def _rel_err(got: torch.Tensor, want: torch.Tensor, scale: float) -> float:
    """max|got - want| / scale (scale = max|want| over the whole output); inf where got is non-finite and want is
    finite."""
    if bool(torch.isfinite(want).all()) and not bool(torch.isfinite(got).all()):
        return math.inf
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    return err / scale if scale > 0 else err


def _compare(got_out, want_out, own_out) -> Dict[str, float]:
    """{output name: relative error of ours} over every float output.

    The reference is eager. Per batch sample, where eager and the model's own path (sdpa) disagree beyond RTOL, the
    model's own path decides: that happens only for query rows whose keys are all masked (a fully padded sample, or
    left-padded positions under a causal mask), which eager's additive finfo.min mask turns into a uniform average
    over all keys and sdpa (and the fused op) into zeros. Such samples are listed as "<name>[b] (own path)"."""
    got, want, own = _float_leaves(got_out), _float_leaves(want_out), _float_leaves(own_out)
    if [n for n, _ in own] != [n for n, _ in want]:
        # the model's own path returns other outputs than eager (sdpa returns no attention weights): it decides
        want = own
    assert [n for n, _ in got] == [n for n, _ in want] == [n for n, _ in own], (
        "the models returned different outputs", [n for n, _ in got], [n for n, _ in want])
    assert want, "no float output to compare"
    errors = {}
    for (name, g), (_, w), (_, o) in zip(got, want, own):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        scale = w.abs().max().item() if w.numel() else 0.0
        if w.dim() == 0 or w.shape[0] != BATCH:
            errors[name] = _rel_err(g, w, scale)
            continue
        worst = 0.0
        for b in range(BATCH):
            if _rel_err(o[b], w[b], scale) <= RTOL:
                worst = max(worst, _rel_err(g[b], w[b], scale))
            else:
                errors[f"{name}[{b}] (own path)"] = _rel_err(g[b], o[b], scale)
        errors[name] = worst
    return errors


def _assert_exact(errors: Dict[str, float]) -> None:
    bad = {name: err for name, err in errors.items() if not err <= RTOL}
    assert not bad, f"relative error above {RTOL} (max|got-want|/max|want|): {bad}"


@dataclass
class Case:
    """Models built by _pair (eager reference, ours, the model's own path), a function running one model on fixed
    inputs (returning its outputs), and the fused calls that one run of ``run(ours)`` must make."""
    models: Tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]
    run: Callable[[torch.nn.Module], object]
    expected_fused: int


def _execute(case: Case):
    """(errors per float output, fused calls seen while our model ran)."""
    ref, ours, own = case.models
    with torch.no_grad():
        want = case.run(ref)
        own_out = case.run(own) if own is not ref else want
        with count_fused_calls() as calls:
            got = case.run(ours)
    return _compare(got, want, own_out), calls.attention_fwd


def _key_padding(batch: int, length: int, valid: List[int], left: bool = False) -> torch.Tensor:
    """(batch, length) long mask, 1 = attend; sample i keeps valid[i] tokens (0 = the whole sample padded)."""
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(valid):
        if n:
            if left:
                mask[i, length - n:] = 1
            else:
                mask[i, :n] = 1
    return mask


# ------------------------------------------------------------------------------------------------------------ cases

QFORMER_FREQ = 2  # a cross-attention every QFORMER_FREQ layers (layers 0, 2, ...)
QFORMER_CROSS = math.ceil(LAYERS / QFORMER_FREQ)


def case_blip2_qformer() -> Case:
    """Q-Former: self-attention over the query tokens + cross-attention to the image embeddings, some image tokens
    padded and one sample's image tokens all padded."""
    cfg = _cls("Blip2QFormerConfig")(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=48, encoder_hidden_size=24,
                                     cross_attention_frequency=QFORMER_FREQ, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    models = _pair(_cls("Blip2QFormerModel"), cfg)
    queries = torch.randn(BATCH, 5, 32)
    image = torch.randn(BATCH, 7, 24)
    image_mask = _key_padding(BATCH, 7, [7, 4, 0])

    def run(model):
        return model(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=image_mask)

    return Case(models, run, expected_fused=LAYERS + QFORMER_CROSS)  # self per layer + cross every FREQ layers


def case_instructblip_qformer() -> Case:
    """InstructBLIP's Q-Former: query tokens + padded instruction text in self-attention (cross-attention from the
    query tokens only), padded image tokens."""
    cfg = _cls("InstructBlipQFormerConfig")(vocab_size=40, hidden_size=32, num_hidden_layers=LAYERS,
                                            num_attention_heads=4, intermediate_size=48, encoder_hidden_size=24,
                                            cross_attention_frequency=QFORMER_FREQ, max_position_embeddings=16,
                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    models = _pair(_cls("InstructBlipQFormerModel"), cfg)
    n_query, n_text = 4, 5
    queries = torch.randn(BATCH, n_query, 32)
    ids = torch.randint(1, 40, (BATCH, n_text))
    text_mask = _key_padding(BATCH, n_text, [5, 2, 3])
    mask = torch.cat([torch.ones(BATCH, n_query, dtype=torch.long), text_mask], dim=1)
    image = torch.randn(BATCH, 6, 24)
    image_mask = _key_padding(BATCH, 6, [6, 3, 5])

    def run(model):
        return model(input_ids=ids, attention_mask=mask, query_embeds=queries, encoder_hidden_states=image,
                     encoder_attention_mask=image_mask)

    return Case(models, run, expected_fused=LAYERS + QFORMER_CROSS)  # self per layer + cross every FREQ layers


RESAMPLER_DEPTH = 2


def case_idefics2_resampler() -> Case:
    """Idefics2's perceiver resampler (GQA: 4 query heads over 2 kv heads): latents attend to [image tokens;
    latents] with some image tokens padded and one sample's image tokens all padded (its latents stay valid keys)."""
    cfg = transformers.models.idefics2.configuration_idefics2.Idefics2PerceiverConfig(
        hidden_size=32, resampler_n_latents=4, resampler_depth=RESAMPLER_DEPTH, resampler_n_heads=4,
        resampler_head_dim=8, num_key_value_heads=2, attention_dropout=0.0)
    models = _pair(transformers.models.idefics2.modeling_idefics2.Idefics2PerceiverResampler, cfg)
    context = torch.randn(BATCH, 7, 32)
    mask = _key_padding(BATCH, 7, [7, 3, 0])

    def run(model):
        return model(context=context, attention_mask=mask)

    return Case(models, run, expected_fused=RESAMPLER_DEPTH)  # one latent cross-attention per resampler layer


def case_siglip2_map_head() -> Case:
    """SigLIP2 NaFlex vision tower with its MAP head (torch.nn.MultiheadAttention over the patches: not counted, but
    it consumes the mask made by the mask interface) and padded patches."""
    cfg = _cls("Siglip2VisionConfig")(hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_channels=3, patch_size=2, num_patches=16,
                                      vision_use_head=True, attention_dropout=0.0)
    models = _pair(_cls("Siglip2VisionModel"), cfg)
    max_patches = 16
    shapes = torch.tensor([[4, 4], [3, 3], [2, 3]])  # 16, 9 and 6 real patches
    pixels = torch.randn(BATCH, max_patches, 3 * 2 * 2)
    mask = _key_padding(BATCH, max_patches, [int(h * w) for h, w in shapes.tolist()])

    def run(model):
        return model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)

    return Case(models, run, expected_fused=LAYERS)  # encoder self-attention; the MAP head is not an interface call


ENC_LAYERS, DEC_LAYERS = 2, 2


def _bart_config(**overrides):
    cfg = dict(vocab_size=50, d_model=32, encoder_layers=ENC_LAYERS, decoder_layers=DEC_LAYERS,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
               max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
               pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    cfg.update(overrides)
    return transformers.BartConfig(**cfg)


def case_bart_encoder_decoder() -> Case:
    """BART: padded encoder (one sample fully padded), causal decoder self-attention with right padding, decoder
    cross-attention over the padded encoder states."""
    models = _pair(_cls("BartModel"), _bart_config())
    ids = torch.randint(3, 50, (BATCH, 7))
    mask = _key_padding(BATCH, 7, [7, 4, 0])
    dec_ids = torch.randint(3, 50, (BATCH, 5))
    dec_mask = _key_padding(BATCH, 5, [5, 3, 4])

    def run(model):
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask)

    # encoder self per layer + decoder (causal self + cross) per layer
    return Case(models, run, expected_fused=ENC_LAYERS + 2 * DEC_LAYERS)


WHISPER_STEPS = 2  # generated tokens after the prompt


def case_whisper_cached_decoding() -> Case:
    """Whisper: a 2-token prompt, then WHISPER_STEPS greedy steps with use_cache=True (q_length 1 calls, causal
    masks aligned bottom-right, cached cross-attention keys); every step's logits and the final cache compared."""
    cfg = _cls("WhisperConfig")(vocab_size=60, num_mel_bins=8, encoder_layers=ENC_LAYERS, decoder_layers=DEC_LAYERS,
                                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                decoder_ffn_dim=48, d_model=32, max_source_positions=8, max_target_positions=16,
                                decoder_start_token_id=1, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                begin_suppress_tokens=None, dropout=0.0, attention_dropout=0.0,
                                activation_dropout=0.0)
    models = _pair(_cls("WhisperForConditionalGeneration"), cfg)
    features = torch.randn(BATCH, 8, 16)
    prompt = torch.randint(2, 60, (BATCH, 2))
    # the tokens fed back: fixed up front, so both models see the same ones whatever their logits
    steps = [torch.randint(2, 60, (BATCH, 1)) for _ in range(WHISPER_STEPS)]

    def run(model):
        out = model(input_features=features, decoder_input_ids=prompt, use_cache=True)
        outputs = [out]
        for token in steps:
            out = model(encoder_outputs=(out.encoder_last_hidden_state,), decoder_input_ids=token, cache=out.cache,
                        use_cache=True)
            outputs.append(out)
        return outputs

    # encoder self per layer once; then (causal self + cross) per decoder layer for the prompt and for every step
    return Case(models, run, expected_fused=ENC_LAYERS + 2 * DEC_LAYERS * (1 + WHISPER_STEPS))


def case_t5_position_bias() -> Case:
    """T5: every attention call gets a position_bias tensor (relative bias in self-attention, zeros in
    cross-attention), so nothing fuses; padded encoder and decoder."""
    cfg = _cls("T5Config")(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=ENC_LAYERS,
                           num_decoder_layers=DEC_LAYERS, num_heads=4, relative_attention_num_buckets=8,
                           relative_attention_max_distance=16, dropout_rate=0.0, decoder_start_token_id=0)
    models = _pair(_cls("T5Model"), cfg)
    ids = torch.randint(1, 50, (BATCH, 7))
    mask = _key_padding(BATCH, 7, [7, 4, 2])
    dec_ids = torch.randint(1, 50, (BATCH, 5))
    dec_mask = _key_padding(BATCH, 5, [5, 3, 4])

    def run(model):
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask)

    # ENC_LAYERS + 2 * DEC_LAYERS calls, each with a position_bias tensor: all fall back
    return Case(models, run, expected_fused=0)


GEMMA2_LAYER_TYPES = ["full_attention", "sliding_attention"]


def _gemma2_case(left: bool, output_attentions: bool = False) -> Case:
    """Gemma2 (declares no sdpa support; GQA 4 over 2; attention logits softcapped): full-attention layers fuse with
    softcap, sliding-window layers (window 3 < sequence 7) fall back to eager; padded batch. With output_attentions
    every call falls back to eager, whose weights are outputs compared too."""
    cfg = _cls("Gemma2Config")(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
                               sliding_window=3, layer_types=GEMMA2_LAYER_TYPES, attn_logit_softcapping=5.0,
                               final_logit_softcapping=None, attention_dropout=0.0, pad_token_id=0)
    models = _pair(_cls("Gemma2Model"), cfg)
    ids = torch.randint(1, 50, (BATCH, 7))
    mask = _key_padding(BATCH, 7, [7, 4, 5], left=left)

    def run(model):
        out = model(input_ids=ids, attention_mask=mask, output_attentions=output_attentions)
        assert not output_attentions or len(out.attentions) == LAYERS
        return out

    if output_attentions:
        return Case(models, run, expected_fused=0)  # every call asked for its weights
    return Case(models, run, expected_fused=GEMMA2_LAYER_TYPES.count("full_attention"))  # sliding layers fall back


def _llama_case(left: bool) -> Case:
    """Llama with GQA (4 query heads over 2 kv heads), a causal mask with right or left padding."""
    cfg = _cls("LlamaConfig")(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                              attention_dropout=0.0, pad_token_id=0)
    models = _pair(_cls("LlamaModel"), cfg)
    ids = torch.randint(1, 50, (BATCH, 7))
    mask = _key_padding(BATCH, 7, [7, 4, 5], left=left)

    def run(model):
        return model(input_ids=ids, attention_mask=mask)

    return Case(models, run, expected_fused=LAYERS)  # one causal (padded) self-attention per layer


DECODE_STEPS = 2


def case_llama_cached_decoding_left_pad() -> Case:
    """Llama GQA generating with a cache from a left-padded prompt (generate's layout: position ids from the mask):
    the prompt's causal mask with left padding, then q_length 1 steps whose masks keep the padded keys masked."""
    cfg = _cls("LlamaConfig")(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                              attention_dropout=0.0, pad_token_id=0)
    models = _pair(_cls("LlamaForCausalLM"), cfg)
    ids = torch.randint(1, 50, (BATCH, 6))
    prompt_mask = _key_padding(BATCH, 6, [6, 3, 4], left=True)
    steps = [torch.randint(1, 50, (BATCH, 1)) for _ in range(DECODE_STEPS)]

    def run(model):
        mask = prompt_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        outputs = [out]
        for token in steps:
            mask = torch.cat([mask, torch.ones(BATCH, 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=out.cache,
                        use_cache=True)
            outputs.append(out)
        return outputs

    # one causal (padded, cache-offset) self-attention per layer, for the prompt and for every step
    return Case(models, run, expected_fused=LAYERS * (1 + DECODE_STEPS))


def case_bert_output_attentions() -> Case:
    """BERT with output_attentions=True: every call falls back to the model's own path, sdpa, which returns no
    weights (transformers warns; out.attentions is empty), so ours must return none either."""
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    models = _pair(transformers.BertModel, cfg)
    ids = torch.randint(1, 50, (BATCH, 7))
    mask = _key_padding(BATCH, 7, [7, 4, 5])

    def run(model):
        return model(input_ids=ids, attention_mask=mask, output_attentions=True)

    return Case(models, run, expected_fused=0)  # LAYERS calls, all asked for their weights


def case_bert_padding() -> Case:
    """BERT encoder: padded batch, one sample fully padded."""
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    models = _pair(transformers.BertModel, cfg)
    ids = torch.randint(1, 50, (BATCH, 7))
    mask = _key_padding(BATCH, 7, [7, 4, 0])

    def run(model):
        return model(input_ids=ids, attention_mask=mask)

    return Case(models, run, expected_fused=LAYERS)  # one self-attention per layer


def case_deit() -> Case:
    """DeiT (cls + distillation tokens), no mask."""
    cfg = _cls("DeiTConfig")(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=LAYERS,
                             num_attention_heads=4, intermediate_size=48, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
    models = _pair(_cls("DeiTModel"), cfg)
    pixels = torch.randn(BATCH, 3, 8, 8)

    def run(model):
        return model(pixel_values=pixels)

    return Case(models, run, expected_fused=LAYERS)  # one self-attention per layer


def case_hf_perceiver() -> Case:
    """transformers' own Perceiver loaded with attn_implementation=NAME: it computes attention itself (no interface
    call, nothing fuses) but builds its padding mask through the mask interface and ADDS it to its scores."""
    cfg = _cls("PerceiverConfig")(num_latents=4, d_latents=32, d_model=24, num_blocks=1, num_self_attends_per_block=2,
                                  num_self_attention_heads=4, num_cross_attention_heads=2,
                                  attention_probs_dropout_prob=0.0)
    models = _pair(_cls("PerceiverModel"), cfg)
    inputs = torch.randn(BATCH, 7, 24)
    mask = _key_padding(BATCH, 7, [7, 4, 2])

    def run(model):
        return model(inputs=inputs, attention_mask=mask)

    return Case(models, run, expected_fused=0)  # no attention-interface call at all


def _models_attr(module: str, kind: str, name: str):
    """A class that transformers does not export at top level (transformers.models.<module>.<kind>_<module>), or
    skip with the reason."""
    try:
        home = __import__(f"transformers.models.{module}.{kind}_{module}", fromlist=[name])
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no models/{module}")
    cls = getattr(home, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {module}.{name}")
    return cls


def _model_cls(module: str, name: str):
    return _models_attr(module, "modeling", name)


def _config_cls(module: str, name: str):
    return _models_attr(module, "configuration", name)


def _module_pair(module_cls, config):
    """_pair for a plain nn.Module taking a config (no ``_from_config``): the implementation is set on each model's
    own copy of the config; the model's own path is sdpa (the caller checks the model classes of the config declare
    it)."""
    models = []
    for implementation in (REFERENCE, NAME, "sdpa"):
        cfg = copy.deepcopy(config)
        cfg._attn_implementation = implementation
        torch.manual_seed(0)
        model = module_cls(cfg).eval()
        if models:
            missing, unexpected = model.load_state_dict(models[0].state_dict(), strict=False)
            assert not unexpected and not missing, (missing, unexpected)
        assert model.config._attn_implementation == implementation
        models.append(model)
    return tuple(models)


def case_aimv2_attention_pooling() -> Case:
    """AIMv2 vision tower with its attention-pooling head (a cls query over the patches through
    F.scaled_dot_product_attention directly: not an interface call, not counted); no mask."""
    cfg = _cls("Aimv2VisionConfig")(hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, num_channels=3, image_size=8, patch_size=2,
                                     use_head=True, attention_dropout=0.0)
    models = _pair(_cls("Aimv2VisionModel"), cfg)
    pixels = torch.randn(BATCH, 3, 8, 8)

    def run(model):
        out = model(pixel_values=pixels)
        assert out.pooler_output is not None
        return out

    return Case(models, run, expected_fused=LAYERS)  # one bidirectional self-attention per layer (mask None)


def case_siglip_map_head() -> Case:
    """SigLIP (v1) vision tower with its MAP head (torch.nn.MultiheadAttention: not an interface call, not counted);
    no mask."""
    cfg = _cls("SiglipVisionConfig")(hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, num_channels=3, image_size=8, patch_size=2,
                                     vision_use_head=True, attention_dropout=0.0)
    models = _pair(_cls("SiglipVisionModel"), cfg)
    pixels = torch.randn(BATCH, 3, 8, 8)

    def run(model):
        out = model(pixel_values=pixels)
        assert out.pooler_output is not None
        return out

    return Case(models, run, expected_fused=LAYERS)  # encoder self-attention; the MAP head is not an interface call


EDGETAM_LAYERS = 2


def case_edgetam_perceiver_resampler() -> Case:
    """EdgeTAM's spatial perceiver resampler (EdgeTamVideoPerceiverResampler, a plain module): 1-D latents attend to
    the flattened feature map (positional encoding added to keys and values), 2-D latents (one per window: batch
    windows, one query) attend to their window; each layer is a cross- then a self-attention; no mask. Run one
    frame at a time (batch 1, as EdgeTamVideoModel feeds it): with a batch above 1 its 2-D path crashes in
    transformers itself before any attention (``latents_2d.unsqueeze(0).expand(batch, -1, -1).view(-1, 1, C)``
    views an expanded tensor)."""
    config_cls = _config_cls("edgetam_video", "EdgeTamVideoConfig")
    resampler_cls = _model_cls("edgetam_video", "EdgeTamVideoPerceiverResampler")
    assert _model_cls("edgetam_video", "EdgeTamVideoModel")._supports_sdpa  # its own path is sdpa (_module_pair)
    cfg = config_cls(perceiver_resampler_num_latents=4, perceiver_resampler_num_latents_2d=4,
                     perceiver_resampler_hidden_size=32, perceiver_resampler_mlp_intermediate_size=48,
                     perceiver_resampler_num_attention_heads=2, perceiver_resampler_attention_head_dim=16,
                     perceiver_resampler_num_layers=EDGETAM_LAYERS, perceiver_resampler_hidden_dropout=0.0,
                     perceiver_resampler_attention_dropout=0.0)
    models = _module_pair(resampler_cls, cfg)
    features = torch.randn(BATCH, 32, 4, 4)  # (frames, C, H, W): 2 x 2 windows of 2 x 2 for the 2-D latents
    positions = torch.randn(BATCH, 32, 4, 4)

    def run(model):
        return [model(features[i:i + 1], positions[i:i + 1]) for i in range(BATCH)]

    # per frame and layer: 1-D latents (cross + self) and 2-D latents (cross + self), bidirectional without a mask
    return Case(models, run, expected_fused=BATCH * 4 * EDGETAM_LAYERS)


VIDEOPRISM_SPATIAL, VIDEOPRISM_TEMPORAL, VIDEOPRISM_AUX = 2, 1, 1


def case_videoprism_pooling_head() -> Case:
    """VideoPrism video model (declares no sdpa support: its own path is its eager function, which softcaps the
    logits): spatial layers (batch B * frames), temporal layers (batch B * patches), auxiliary layers, then its
    attention-pooling head (one learned query, scaling=1.0 with the scale folded into the query, softcap=None),
    which does go through the interface; no mask."""
    cfg = _cls("VideoPrismVisionConfig")(image_size=8, num_frames=2, tubelet_size=(1, 4, 4), num_channels=3,
                                         hidden_size=32, num_attention_heads=4, intermediate_size=48,
                                         num_spatial_layers=VIDEOPRISM_SPATIAL, num_temporal_layers=VIDEOPRISM_TEMPORAL,
                                         num_auxiliary_layers=VIDEOPRISM_AUX, attn_logit_softcapping=5.0,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model_cls = _cls("VideoPrismVideoModel")
    assert not model_cls._supports_sdpa
    models = _pair(model_cls, cfg)
    videos = torch.randn(BATCH, 2, 3, 8, 8)

    def run(model):
        return model(pixel_values_videos=videos)

    # every self-attention (softcapped, no mask) + the pooling head's cross-attention
    return Case(models, run, expected_fused=VIDEOPRISM_SPATIAL + VIDEOPRISM_TEMPORAL + VIDEOPRISM_AUX + 1)


def case_molmo2_pooling() -> Case:
    """Molmo2's image pooling (Molmo2Adapter): each output token's query (the mean of its patches) attends to its
    pool of patches with GQA (4 query heads over 2 kv heads) and a key padding mask from the -1 slots of
    pooled_patches_idx; one token is all padding (dropped from the output by the adapter itself)."""
    cfg = _config_cls("molmo2", "Molmo2AdapterConfig")(vision_feature_layer=[-1], hidden_size=32,
                                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                        attention_dropout=0.0, intermediate_size=48,
                                                        text_hidden_size=24)
    models = _pair(_model_cls("molmo2", "Molmo2Adapter"), cfg)
    features = torch.randn(2, 9, 32)  # (crops, patches, hidden * len(vision_feature_layer))
    pooled = torch.tensor([[0, 1, 3, 4], [2, 5, -1, -1], [-1, -1, -1, -1], [9, 10, 12, -1], [17, -1, -1, -1]])

    def run(model):
        return model(image_features=features, pooled_patches_idx=pooled)

    return Case(models, run, expected_fused=1)  # one padded GQA cross-attention


MUSICGEN_CODEBOOKS = 2


def case_musicgen_decoder_cross_attention() -> Case:
    """MusicGen decoder (codebook-summed embeddings): causal self-attention with right padding, cross-attention to
    encoder states with padding in the encoder attention mask (one sample's encoder states all padded)."""
    cfg = _cls("MusicgenDecoderConfig")(vocab_size=40, max_position_embeddings=32, num_hidden_layers=LAYERS,
                                        ffn_dim=48, num_attention_heads=4, hidden_size=32, dropout=0.0,
                                        attention_dropout=0.0, activation_dropout=0.0,
                                        num_codebooks=MUSICGEN_CODEBOOKS, pad_token_id=40, bos_token_id=40)
    models = _pair(_cls("MusicgenModel"), cfg)
    ids = torch.randint(0, 40, (BATCH * MUSICGEN_CODEBOOKS, 6))
    mask = _key_padding(BATCH, 6, [6, 4, 5])
    encoder = torch.randn(BATCH, 7, 32)
    encoder_mask = _key_padding(BATCH, 7, [7, 3, 0])

    def run(model):
        return model(input_ids=ids, attention_mask=mask, encoder_hidden_states=encoder,
                     encoder_attention_mask=encoder_mask)

    return Case(models, run, expected_fused=2 * LAYERS)  # causal padded self + padded cross per decoder layer


def case_qwen2_gqa_bias_left_pad() -> Case:
    """Qwen2 (q/k/v with bias, GQA 4 over 2, no sliding window: sliding_window=None in every call), left padding."""
    cfg = _cls("Qwen2Config")(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                              use_sliding_window=False, attention_dropout=0.0, pad_token_id=0)
    models = _pair(_cls("Qwen2Model"), cfg)
    ids = torch.randint(1, 50, (BATCH, 7))
    mask = _key_padding(BATCH, 7, [7, 4, 5], left=True)

    def run(model):
        return model(input_ids=ids, attention_mask=mask)

    return Case(models, run, expected_fused=LAYERS)  # one causal (left-padded) GQA self-attention per layer


def _mistral_case(sliding_window) -> Case:
    """Mistral GQA, right padding. sliding_window=None: the plain causal mask, sliding_window=None in every call.
    sliding_window=3 (< sequence 7): a sliding-window mask and kwarg, every call falls back."""
    cfg = _cls("MistralConfig")(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
                                sliding_window=sliding_window, attention_dropout=0.0, pad_token_id=0)
    models = _pair(_cls("MistralModel"), cfg)
    ids = torch.randint(1, 50, (BATCH, 7))
    mask = _key_padding(BATCH, 7, [7, 4, 5])

    def run(model):
        return model(input_ids=ids, attention_mask=mask)

    # one causal padded self-attention per layer; none when every layer has a sliding window
    return Case(models, run, expected_fused=LAYERS if sliding_window is None else 0)


def case_gpt2_padding() -> Case:
    """GPT-2 (its eager function softmaxes without an fp32 upcast): causal self-attention, padded batch."""
    cfg = _cls("GPT2Config")(vocab_size=50, n_positions=16, n_embd=32, n_layer=LAYERS, n_head=4, n_inner=48,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1,
                             eos_token_id=1)
    models = _pair(_cls("GPT2Model"), cfg)
    ids = torch.randint(1, 50, (BATCH, 7))
    mask = _key_padding(BATCH, 7, [7, 4, 5])

    def run(model):
        return model(input_ids=ids, attention_mask=mask)

    return Case(models, run, expected_fused=LAYERS)  # one causal padded self-attention per layer


MODERNBERT_LAYER_TYPES = ["full_attention", "sliding_attention", "full_attention"]


def case_modernbert_padding() -> Case:
    """ModernBERT: global layers (bidirectional, padded: fuse) and local layers (a sliding window of
    local_attention=4 < sequence 7, passed as the sliding_window kwarg with a sliding mask: fall back); one sample
    fully padded."""
    cfg = _cls("ModernBertConfig")(vocab_size=50, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=len(MODERNBERT_LAYER_TYPES), num_attention_heads=4,
                                   layer_types=MODERNBERT_LAYER_TYPES, local_attention=4, max_position_embeddings=32,
                                   attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    models = _pair(_cls("ModernBertModel"), cfg)
    ids = torch.randint(1, 50, (BATCH, 7))
    mask = _key_padding(BATCH, 7, [7, 4, 0])

    def run(model):
        return model(input_ids=ids, attention_mask=mask)

    return Case(models, run, expected_fused=MODERNBERT_LAYER_TYPES.count("full_attention"))  # sliding layers fall back


def case_vit_interpolate_pos_encoding() -> Case:
    """ViT at 12 x 12 pixels for an 8 x 8 config, interpolate_pos_encoding=True (9 patches + cls instead of 4 + cls);
    no mask."""
    cfg = _cls("ViTConfig")(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=LAYERS,
                            num_attention_heads=4, intermediate_size=48, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    models = _pair(_cls("ViTModel"), cfg)
    pixels = torch.randn(BATCH, 3, 12, 12)

    def run(model):
        out = model(pixel_values=pixels, interpolate_pos_encoding=True)
        assert out.last_hidden_state.shape[1] == 1 + 9
        return out

    return Case(models, run, expected_fused=LAYERS)  # one self-attention per layer


CASES: Dict[str, Callable[[], Case]] = {
    "blip2_qformer": case_blip2_qformer,
    "instructblip_qformer": case_instructblip_qformer,
    "idefics2_resampler_gqa": case_idefics2_resampler,
    "siglip2_map_head": case_siglip2_map_head,
    "bart_encoder_decoder": case_bart_encoder_decoder,
    "whisper_cached_decoding": case_whisper_cached_decoding,
    "t5_position_bias": case_t5_position_bias,
    "gemma2_no_sdpa_softcap_right_pad": lambda: _gemma2_case(left=False),
    "gemma2_no_sdpa_softcap_left_pad": lambda: _gemma2_case(left=True),
    "gemma2_output_attentions": lambda: _gemma2_case(left=True, output_attentions=True),
    "llama_gqa_right_pad": lambda: _llama_case(left=False),
    "llama_gqa_left_pad": lambda: _llama_case(left=True),
    "llama_cached_decoding_left_pad": case_llama_cached_decoding_left_pad,
    "bert_padding": case_bert_padding,
    "bert_output_attentions": case_bert_output_attentions,
    "deit": case_deit,
    "hf_perceiver": case_hf_perceiver,
    "aimv2_attention_pooling": case_aimv2_attention_pooling,
    "siglip_map_head": case_siglip_map_head,
    "edgetam_perceiver_resampler": case_edgetam_perceiver_resampler,
    "videoprism_pooling_head": case_videoprism_pooling_head,
    "molmo2_pooling_gqa": case_molmo2_pooling,
    "musicgen_decoder_cross_attention": case_musicgen_decoder_cross_attention,
    "qwen2_gqa_bias_left_pad": case_qwen2_gqa_bias_left_pad,
    "mistral_no_sliding_window": lambda: _mistral_case(sliding_window=None),
    "mistral_sliding_window": lambda: _mistral_case(sliding_window=3),
    "gpt2_padding": case_gpt2_padding,
    "modernbert_padding": case_modernbert_padding,
    "vit_interpolate_pos_encoding": case_vit_interpolate_pos_encoding,
}


@pytest.mark.parametrize("name", list(CASES))
def test_client_matches_eager_and_fuses(name):
    case = CASES[name]()
    errors, fused = _execute(case)
    _assert_exact(errors)
    assert fused == case.expected_fused, f"fused calls: {fused}, expected {case.expected_fused}"
