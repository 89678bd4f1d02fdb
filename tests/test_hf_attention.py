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
