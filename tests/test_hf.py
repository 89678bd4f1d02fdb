"""Parity with transformers' Perceiver: perceiver_io_from_hf and patch_hf_perceiver (no network: random init)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
mp = pytest.importorskip("transformers.models.perceiver.modeling_perceiver")

from perceiver_fast.integrations import (  # noqa: E402
    hf_state_dict,
    patch_hf_perceiver,
    perceiver_io_from_hf,
    perceiver_io_from_hf_config,
    unpatch_hf_perceiver,
)
from perceiver_fast.models import PerceiverIO  # noqa: E402

VARIANTS = {
    "learned": (transformers.PerceiverForImageClassificationLearned, 8),
    "fourier": (transformers.PerceiverForImageClassificationFourier, 8),
    "conv": (transformers.PerceiverForImageClassificationConvProcessing, 12),
}


def _hf(kind, dropout=0.0, **overrides):
    cls, image_size = VARIANTS[kind]
    cfg = dict(num_latents=4, d_latents=16, num_blocks=2, num_self_attends_per_block=1, num_self_attention_heads=2,
               num_cross_attention_heads=1, image_size=image_size, num_labels=5, initializer_range=0.2,
               attention_probs_dropout_prob=dropout)
    cfg.update(overrides)
    torch.manual_seed(0)
    return cls(transformers.PerceiverConfig(**cfg)), image_size


def _grads_as_ours(hf_model, kind):
    """The HF model's gradients, laid out as our PerceiverIO's state_dict."""
    shadow = copy.deepcopy(hf_model)
    for p_shadow, p in zip(shadow.parameters(), hf_model.parameters()):
        p_shadow.data = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    return hf_state_dict(shadow.perceiver, kind)


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_from_hf_float64_eager_is_exact(kind):
    hf, size = _hf(kind)
    hf = hf.double().eval()
    ours = perceiver_io_from_hf(hf, attention="eager")
    assert next(ours.parameters()).dtype == torch.float64 and not ours.training
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    # fourier/conv are not bit-exact: HF builds the Fourier features in float32 even for a float64
    # model (sin(pi f x) with f up to 28 carries ~1e-5 absolute error there), while our encoder
    # computes them in float64.
    tol = dict(rtol=1e-10, atol=1e-12) if kind == "learned" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours(x), hf(inputs=x).logits, **tol)


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_from_hf_fused_logits_and_gradients(kind):
    hf, size = _hf(kind)
    hf.train()  # dropout is 0; conv's BatchNorm uses batch statistics in both
    ours = perceiver_io_from_hf(hf, attention="fused", fold=True)  # the folded path against HF's unfolded one
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([1, 3])
    hf_out = hf(inputs=x, labels=y)
    logits = ours(x)
    torch.testing.assert_close(logits, hf_out.logits, rtol=1e-4, atol=1e-5)
    hf_out.loss.backward()
    torch.nn.functional.cross_entropy(logits, y).backward()
    want = _grads_as_ours(hf, kind)
    for name, p in ours.named_parameters():
        if name.endswith("to_k.bias"):  # cancels in the softmax: HF's gradient is ~0, the folded path's exactly 0
            assert want[name].abs().max() < 1e-6 and p.grad.abs().max() < 1e-6
            continue
        torch.testing.assert_close(p.grad, want[name], rtol=1e-3, atol=1e-5, msg=name)



def test_from_hf_follows_the_config():
    """use_query_residual=False (the encoder cross-attention without the latent residual) converts exactly,
    the attention dropout carries over, and an activation other than exact GELU is refused."""
    hf, size = _hf("learned", dropout=0.25, use_query_residual=False)
    hf.eval()
    ours = perceiver_io_from_hf(hf, attention="eager")
    assert not ours.cross_attention.attn.use_query_residual
    assert ours.cross_attention.attn.dropout == 0.25 and ours.self_attends[0].dropout == 0.25
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(ours(x), hf(inputs=x).logits, rtol=1e-4, atol=1e-5)
    assert perceiver_io_from_hf_config(hf.config).cross_attention.attn.use_query_residual is False
    hf, _ = _hf("learned", hidden_act="relu")
    with pytest.raises(ValueError, match="hidden_act"):
        perceiver_io_from_hf(hf)

@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_patch_hf_perceiver_eval_logits_equal(kind):
    hf, size = _hf(kind)
    hf.eval()
    patched = patch_hf_perceiver(copy.deepcopy(hf))
    assert type(patched.perceiver.encoder.cross_attention.attention.self).__name__ == "FastPerceiverSelfAttention"
    assert list(patched.state_dict()) == list(hf.state_dict())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(patched(inputs=x).logits, hf(inputs=x).logits, rtol=1e-4, atol=1e-5)
    unpatch_hf_perceiver(patched)
    assert type(patched.perceiver.encoder.cross_attention.attention.self) is mp.PerceiverSelfAttention


def test_patch_hf_perceiver_training_gradients_and_mask():
    hf, size = _hf("fourier")
    hf.train()
    patched = patch_hf_perceiver(copy.deepcopy(hf))
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([0, 4])
    mask = torch.ones(2, size * size)
    mask[1, 40:] = 0  # key padding of the inputs
    out_hf = hf(inputs=x, labels=y, attention_mask=mask)
    out_p = patched(inputs=x, labels=y, attention_mask=mask)
    torch.testing.assert_close(out_p.logits, out_hf.logits, rtol=1e-4, atol=1e-5)
    out_hf.loss.backward()
    out_p.loss.backward()
    for (name, p), q in zip(patched.named_parameters(), hf.parameters()):
        if "cross_attention.attention.self.key.bias" in name:  # true gradient 0 (cancels in the softmax)
            assert p.grad.abs().max() < 1e-6 and q.grad.abs().max() < 1e-6
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_patch_hf_perceiver_trains_with_dropout():
    hf, size = _hf("learned", dropout=0.1)
    patched = patch_hf_perceiver(hf).train()
    x = torch.randn(2, 3, size, size)
    loss = patched(inputs=x, labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert patched.perceiver.embeddings.latents.grad.abs().sum() > 0


def test_patched_fourier_features_are_built_by_our_encoder(monkeypatch):
    hf, size = _hf("fourier")
    hf.eval()
    x = torch.randn(1, 3, size, size)
    want = hf(inputs=x).logits
    patch_hf_perceiver(hf)

    def forbidden(*args, **kwargs):
        raise AssertionError("HF's CPU Fourier construction was called")

    monkeypatch.setattr(mp, "build_linear_positions", forbidden)
    monkeypatch.setattr(mp, "generate_fourier_features", forbidden)
    with torch.no_grad():
        torch.testing.assert_close(hf(inputs=x).logits, want, rtol=1e-4, atol=1e-5)


def test_output_attentions_falls_back_to_hf():
    hf, size = _hf("learned")
    hf.eval()
    patched = patch_hf_perceiver(copy.deepcopy(hf))
    x = torch.randn(1, 3, size, size)
    out = patched(inputs=x, output_attentions=True)
    assert out.cross_attentions[0].shape == (1, 1, 4, size * size)
    torch.testing.assert_close(out.logits, hf(inputs=x).logits, rtol=1e-4, atol=1e-5)


def test_bad_uses():
    with pytest.raises(ValueError, match="no transformers PerceiverSelfAttention"):
        patch_hf_perceiver(torch.nn.Linear(2, 2))
    hf, _ = _hf("learned")
    with pytest.raises(ValueError, match="attention must be one of"):
        patch_hf_perceiver(hf, attention="sdpa")
    bare = transformers.PerceiverModel(transformers.PerceiverConfig(num_latents=2, d_latents=8, d_model=8,
                                                                    num_self_attends_per_block=1,
                                                                    num_self_attention_heads=1,
                                                                    num_cross_attention_heads=1))
    with pytest.raises(ValueError, match="perceiver_io_from_hf converts"):
        perceiver_io_from_hf(bare)


def test_patch_text_models_multihead_and_padding():
    """PerceiverForMaskedLM: text preprocessor, padded inputs, 2 cross heads, a decoder with 8 heads and
    qk/v head widths that differ; PerceiverForSequenceClassification too."""
    cfg = dict(d_model=16, d_latents=16, num_latents=4, max_position_embeddings=8, num_blocks=1,
               num_self_attends_per_block=1, num_cross_attention_heads=2, num_self_attention_heads=2,
               vocab_size=20, num_labels=3, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    ids = torch.randint(0, 20, (2, 8))
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    for cls in (transformers.PerceiverForMaskedLM, transformers.PerceiverForSequenceClassification):
        hf = cls(transformers.PerceiverConfig(**cfg)).eval()
        patched = patch_hf_perceiver(copy.deepcopy(hf))
        with torch.no_grad():
            want = hf(inputs=ids, attention_mask=mask).logits
            torch.testing.assert_close(patched(inputs=ids, attention_mask=mask).logits, want, rtol=1e-4, atol=1e-5)


def test_parameter_count_matches_hf_learned():
    cfg = transformers.PerceiverConfig(num_latents=8, d_latents=32, num_blocks=2, num_self_attends_per_block=2,
                                       num_self_attention_heads=4, num_cross_attention_heads=1, image_size=8,
                                       num_labels=7, self_attention_widening_factor=1,
                                       cross_attention_widening_factor=1)
    hf = transformers.PerceiverForImageClassificationLearned(cfg)
    ours = PerceiverIO(image_size=8, num_classes=7, num_latents=8, latent_dim=32, num_blocks=2,
                       num_self_attends_per_block=2, self_heads=4)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    from_cfg = perceiver_io_from_hf_config(cfg, "learned")
    assert {k: v.shape for k, v in from_cfg.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    conv = perceiver_io_from_hf_config(cfg, "conv", image_size=16)
    assert conv.preprocessor.max_resolution == (56, 56)
