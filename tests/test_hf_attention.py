"""register_hf_attention: real transformers ViT and BERT models (small configs, random init, no downloads) with
attn_implementation="perceiver_fast" against sdpa / eager, masks, fallbacks, and the fused-call counts."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import count_fused_calls  # noqa: E402
from perceiver_fast.integrations import register_hf_attention  # noqa: E402

NAME = register_hf_attention()
LAYERS = 2


def _bert_config(**overrides):
    cfg = dict(vocab_size=50, hidden_size=24, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=40,
               max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(overrides)
    return transformers.BertConfig(**cfg)


def _pair(model_cls, config, reference="sdpa"):
    """(reference model, the same weights with attn_implementation=NAME), both in eval mode."""
    torch.manual_seed(0)
    # _from_config writes the implementation into the config object it is given: each model gets its own copy
    ref = model_cls._from_config(copy.deepcopy(config), attn_implementation=reference).eval()
    ours = model_cls._from_config(copy.deepcopy(config), attn_implementation=NAME).eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == NAME and ref.config._attn_implementation == reference
    return ref, ours


def _padding_mask(batch=3, length=7):
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2:] = 0  # a sample with every key padded: sdpa and eager agree with the op's rule here
    return mask


def _bert_outputs(ref, ours, ids, mask):
    """(reference output, our output, the fused calls of our forward), without autograd."""
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).last_hidden_state
        with count_fused_calls() as calls:
            got = ours(ids, attention_mask=mask).last_hidden_state
    return want, got, calls


@pytest.mark.parametrize("reference", ["sdpa", "eager"])
def test_bert_padding_mask_runs_fused(reference):
    """A 2-D padding mask reaches the kernel as a key-padding mask (head dim 12: not a multiple of 8), a fully
    padded sample included."""
    ref, ours = _pair(transformers.BertModel, _bert_config(), reference)
    ids = torch.randint(0, 50, (3, 7))
    want, got, calls = _bert_outputs(ref, ours, ids, _padding_mask())
    with torch.no_grad():
        unmasked = ours(ids).last_hidden_state
    assert calls.attention_fwd == LAYERS
    # Sample 2 has every key padded: BERT's own path (sdpa) and the op give zeros there, eager a uniform average
    rows = slice(None) if reference == "sdpa" else slice(0, 2)
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-4, atol=1e-5)
    assert (unmasked[1] - got[1]).abs().max() > 1e-3  # the mask was honoured, not dropped
    torch.testing.assert_close(unmasked[0], got[0], rtol=1e-4, atol=1e-5)


def test_bert_training_gradients_match_sdpa():
    ref, ours = _pair(transformers.BertModel, _bert_config())
    ids = torch.randint(0, 50, (2, 6))
    mask = _padding_mask(2, 6)
    ref.train()
    ours.train()
    # A random projection: the squared sum of a LayerNorm output is constant, its gradients rounding noise
    weight = torch.randn(2, 6, 24)
    (ref(ids, attention_mask=mask).last_hidden_state * weight).sum().backward()
    with count_fused_calls() as calls:
        (ours(ids, attention_mask=mask).last_hidden_state * weight).sum().backward()
    assert calls.attention_fwd == LAYERS
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_vit_and_set_attn_implementation():
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=24,
                                    num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=40)
    ref, ours = _pair(transformers.ViTModel, config)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state
        with count_fused_calls() as calls:
            got = ours(pixel_values=x).last_hidden_state
        assert calls.attention_fwd == LAYERS
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        ref.set_attn_implementation(NAME)
        with count_fused_calls() as calls:
            again = ref(pixel_values=x).last_hidden_state
    assert calls.attention_fwd == LAYERS
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-5)


def test_causal_decoder_with_padding_fuses():
    """BERT as a causal decoder with padding: the mask function hands transformers' own causal mask through and
    records its pattern (bottom-right causal + key padding), so the call fuses with the same result."""
    ref, ours = _pair(transformers.BertModel, _bert_config(is_decoder=True))
    want, got, calls = _bert_outputs(ref, ours, torch.randint(0, 50, (3, 7)), _padding_mask())
    assert calls.attention_fwd == LAYERS
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_custom_4d_mask_and_float64_fall_back():
    ref, ours = _pair(transformers.BertModel, _bert_config())
    ids = torch.randint(0, 50, (2, 5))
    bias = torch.zeros(2, 1, 5, 5)
    bias[0, 0, 2, 1] = -30.0  # differs between queries and is soft: only sdpa can apply it
    want, got, calls = _bert_outputs(ref, ours, ids, bias)
    assert calls.attention_fwd == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    want, got, calls = _bert_outputs(ref.double(), ours.double(), ids, None)
    assert calls.attention_fwd == 0 and got.dtype == torch.float64
    torch.testing.assert_close(got, want)


def test_register_is_idempotent_and_refuses_reserved_names():
    assert register_hf_attention() == NAME == register_hf_attention(NAME)
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert NAME in ALL_ATTENTION_FUNCTIONS and NAME in ALL_MASK_ATTENTION_FUNCTIONS
    for bad in ("my/kernel", "sdpa_fast", "flash_attention_2", "flex_attention", ""):
        with pytest.raises(ValueError, match="name must be"):
            register_hf_attention(bad)


@pytest.mark.parametrize("model_type,own", [("bert", "sdpa"), ("gemma2", "eager")])
@pytest.mark.parametrize("causal", [False, True])
def test_mask_function_returns_the_models_own_mask(model_type, own, causal):
    """Registering the interface changes nothing outside the attention function: the mask a model (and any code of
    it that reads the mask) gets is exactly the one of its own path: sdpa's bool mask, or eager's additive mask for
    a model without sdpa support."""
    from transformers import AutoConfig, masking_utils

    config = AutoConfig.for_model(model_type)
    config._attn_implementation = NAME
    own_config = copy.deepcopy(config)
    own_config._attn_implementation = own
    embeds = torch.randn(3, 5, 8)
    padding = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    make = masking_utils.create_causal_mask if causal else masking_utils.create_bidirectional_mask
    args = dict(inputs_embeds=embeds, attention_mask=padding, **({"cache": None} if causal else {}))
    got, want = make(config=config, **args), make(config=own_config, **args)
    assert got.dtype == want.dtype and torch.equal(got, want)
    from perceiver_fast.integrations.hf_attention import mask_pattern

    pattern = mask_pattern(got)
    assert pattern is not None and pattern.causal == causal and torch.equal(pattern.key_padding, padding.bool())
    assert mask_pattern(got.clone()) is None  # a mask not built by the mask function has no pattern


def test_static_cache_offsets_fall_back_exactly():
    """A static cache gives the mask a tensor query offset, which the mask function does not read (a host sync):
    those calls run sdpa; the prefill with is_causal on a cache longer than the prompt fuses (top-left over the
    first N keys)."""
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      pad_token_id=0)
    ref, ours = _pair(transformers.LlamaForCausalLM, config)
    ids = torch.randint(1, 40, (2, 5))
    kw = dict(max_new_tokens=3, do_sample=False, cache_implementation="static", return_dict_in_generate=True,
              output_logits=True, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        with count_fused_calls() as calls:
            got = ours.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.logits, want.logits):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert calls.attention_fwd == LAYERS  # the prefill fused; the 2 cached steps (tensor offset) ran sdpa


def test_torch_compile_fullgraph_stays_exact_across_masks():
    """Under torch.compile the mask side table is not read (ids of traced tensors are not the run's): masked calls
    trace the model's own path, fullgraph=True compiles, and every mask gives sdpa's answer."""
    ref, ours = _pair(transformers.BertModel, _bert_config())
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        for trial in range(3):
            mask = torch.ones(3, 7, dtype=torch.long)
            mask[trial, 2 + trial:] = 0
            want = ref(ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(compiled(ids, attention_mask=mask).last_hidden_state, want,
                                       rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(ids).last_hidden_state, ref(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_mask_edited_in_place_is_not_trusted():
    """A 4-D mask built by the mask interface and edited in place afterwards (a reused buffer) no longer matches
    its recorded pattern: the call runs the model's own path with the edited mask."""
    from transformers import masking_utils

    ref, ours = _pair(transformers.BertModel, _bert_config())
    ids = torch.randint(0, 50, (2, 6))
    padding = torch.ones(2, 6, dtype=torch.long)
    padding[0, 5] = 0  # some padding, so the interface materialises the mask
    embeds = torch.zeros(2, 6, 24)
    ours_mask = masking_utils.create_bidirectional_mask(config=ours.config, inputs_embeds=embeds,
                                                        attention_mask=padding)
    ref_mask = masking_utils.create_bidirectional_mask(config=ref.config, inputs_embeds=embeds,
                                                       attention_mask=padding)
    for m in (ours_mask, ref_mask):
        m[1, ..., 3:] = False  # the same in-place edit of both
    with torch.no_grad():
        want = ref(ids, attention_mask=ref_mask).last_hidden_state
        with count_fused_calls() as calls:
            got = ours(ids, attention_mask=ours_mask).last_hidden_state
    assert calls.attention_fwd == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
