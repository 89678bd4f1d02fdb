"""krasserm's perceiver-io and pio-arch, patched against unpatched on the same weights, on the real packages.

perceiver-io: ``PerceiverIO`` (``PerceiverEncoder`` + ``PerceiverDecoder``) and ``CausalSequenceModel`` (Perceiver
AR) from ``perceiver.model.core``; pio-arch: ``PIOAttentionModel`` (``nn.MultiheadAttention``). Each model is
deep-copied and the copy patched with ``patch_model``; forward and every parameter gradient agree in fp32 within
1e-5 relative, with masks that include a fully padded sample, in train mode (dropout 0) and in eval; the fused
calls are counted; ``state_dict`` round-trips between patched and unpatched models; unpatching restores the
package's forward.
"""
import copy

import pytest
import torch
from helpers import count_fused_calls
from torch import nn

from perceiver_fast.integrations import krasserm, patch_multihead_attention, unpatch_multihead_attention
from perceiver_fast.integrations.patching import is_fused_forward, patch_classes, patch_model, unpatch_model

TOL = 1e-5
VOCAB, SEQ, B = 11, 6, 3


def core():
    return pytest.importorskip(
        "perceiver.model.core",
        reason="perceiver-io (krasserm) is not installed (CI: pip install --no-deps --ignore-requires-python "
               "perceiver-io==0.11.0, plus einops and fairscale)")


def rel(ref: torch.Tensor, got: torch.Tensor, scale: float = 0.0) -> float:
    """max|diff| / max|ref|; ``scale`` replaces a denominator that is tiny next to it (see grads_match)."""
    den = ref.abs().max().item()
    if den < 1e-4 * scale:
        den = scale
    return (got - ref).abs().max().item() / max(den, 1e-30)


def grads_match(ref: nn.Module, got: nn.Module) -> None:
    """Every parameter's gradient within TOL relative. A gradient that is zero in exact arithmetic (the key bias
    without rotary embeddings: the softmax ignores a per-query constant) holds only rounding noise; it is compared
    against the largest gradient of the model instead of its own maximum."""
    named = dict(got.named_parameters())
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    for name, p in ref.named_parameters():
        if p.grad is None:
            assert named[name].grad is None, name
            continue
        assert named[name].grad is not None, name
        assert rel(p.grad, named[name].grad, scale) < TOL, (name, rel(p.grad, named[name].grad, scale))


def pair(model: nn.Module, kind: str, expected_modules: int):
    """(reference, patched deep copy); checks the report."""
    patched = copy.deepcopy(model)
    report = patch_model(patched)
    assert report.patched.get(kind) == expected_modules, str(report)
    return model, patched


# ---------------------------------------------------------------------------------------------------------------
# krasserm: PerceiverIO (encoder + decoder)
# ---------------------------------------------------------------------------------------------------------------
CROSS_LAYERS, SELF_BLOCKS, SELF_LAYERS = 2, 2, 2


def perceiver_io(dropout: float = 0.0):
    c = core()
    encoder = c.PerceiverEncoder(
        c.TokenInputAdapter(vocab_size=VOCAB, max_seq_len=SEQ, num_input_channels=8), num_latents=3,
        num_latent_channels=8, num_cross_attention_heads=2, num_cross_attention_v_channels=12,
        num_cross_attention_layers=CROSS_LAYERS, num_self_attention_heads=2,
        num_self_attention_layers_per_block=SELF_LAYERS, num_self_attention_blocks=SELF_BLOCKS,
        first_self_attention_block_shared=False, dropout=dropout)
    decoder = c.PerceiverDecoder(c.ClassificationOutputAdapter(num_classes=5, num_output_query_channels=8),
                                 c.TrainableQueryProvider(1, 8), num_latent_channels=8, num_cross_attention_heads=2,
                                 dropout=dropout)
    return c.PerceiverIO(encoder, decoder)


# Modules: 2 encoder cross-attention layers (the second is not shared), 2 self-attention blocks of 2 layers (not
# shared), 1 decoder cross-attention.
IO_MODULES = CROSS_LAYERS + SELF_BLOCKS * SELF_LAYERS + 1
# Calls per forward: the encoder's cross-attention runs once per cross-attention layer, each block's self-attention
# layers once per block, the decoder once.
IO_CALLS = CROSS_LAYERS + SELF_BLOCKS * SELF_LAYERS + 1


def io_inputs():
    x = torch.randint(VOCAB, (B, SEQ))
    pad = torch.zeros(B, SEQ, dtype=torch.bool)
    pad[0] = True  # a fully padded sample: the package averages all values uniformly
    pad[1, -2:] = True
    return x, pad


def run_io(model, x, pad):
    return model.decoder(model.encoder(x, pad_mask=pad))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_perceiver_io_matches_unpatched(train, masked):
    ref, fused = pair(perceiver_io(), krasserm.KIND, IO_MODULES)
    ref.train(train), fused.train(train)
    x, pad = io_inputs()
    pad = pad if masked else None
    out_ref = run_io(ref, x, pad)
    with count_fused_calls() as calls:
        out = run_io(fused, x, pad)
    assert calls.attention_fwd == IO_CALLS
    assert rel(out_ref, out) < TOL
    out_ref.square().sum().backward()
    out.square().sum().backward()
    grads_match(ref, fused)


def test_perceiver_io_latents_stay_batch_shared():
    """The encoder's latents enter its first cross-attention with batch 1 (not expanded): the op takes Bq = 1."""
    c = core()
    _, fused = pair(perceiver_io(), krasserm.KIND, IO_MODULES)
    seen = []
    attn = fused.encoder.cross_attn_1[0].module.attention
    assert isinstance(attn, c.MultiHeadAttention)
    attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    run_io(fused, *io_inputs())
    assert seen[0] == 1


# ---------------------------------------------------------------------------------------------------------------
# krasserm: CausalSequenceModel (Perceiver AR)
# ---------------------------------------------------------------------------------------------------------------
AR_SELF_LAYERS = 2
AR_SEQ, PREFIX = 6, 2  # 4 latents (queries), keys = prefix + latents


def causal_model(**overrides):
    c = core()
    cfg = dict(vocab_size=VOCAB, max_seq_len=8, max_latents=4, num_channels=8, num_heads=2, max_heads_parallel=1,
               num_self_attention_layers=AR_SELF_LAYERS, self_attention_widening_factor=1,
               cross_attention_widening_factor=1, cross_attention_dropout=0.0, post_attention_dropout=0.0)
    cfg.update(overrides)
    return c.CausalSequenceModel(c.CausalSequenceModelConfig(**cfg))


# One causal prefix cross-attention + the causal self-attention layers, per forward (and per modules).
AR_CALLS = 1 + AR_SELF_LAYERS


def ar_inputs(fully_padded: bool = True):
    x = torch.randint(VOCAB, (B, AR_SEQ))
    pad = torch.zeros(B, AR_SEQ, dtype=torch.bool)  # left padding, as the package requires
    if fully_padded:
        pad[0] = True
    pad[1, :3] = True  # 1 padded prefix key and 2 padded latents: their causal windows hold no unpadded key
    return x, pad


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("abs_pos_emb", [True, False], ids=["half-rotary", "full-rotary"])
def test_causal_sequence_model_matches_unpatched(train, masked, abs_pos_emb):
    ref, fused = pair(causal_model(abs_pos_emb=abs_pos_emb), krasserm.KIND, AR_CALLS)
    ref.train(train), fused.train(train)
    x, pad = ar_inputs()
    pad = pad if masked else None
    out_ref = ref(x, prefix_len=PREFIX, pad_mask=pad).logits
    with count_fused_calls() as calls:
        out = fused(x, prefix_len=PREFIX, pad_mask=pad).logits
    assert calls.attention_fwd == AR_CALLS
    assert rel(out_ref, out) < TOL
    out_ref.square().sum().backward()
    out.square().sum().backward()
    grads_match(ref, fused)


def test_causal_sequence_model_prefix_dropout_in_training():
    """cross_attention_dropout drops prefix positions (the package's torch.rand, same seed): still fused."""
    ref, fused = pair(causal_model(cross_attention_dropout=0.5), krasserm.KIND, AR_CALLS)
    x, pad = ar_inputs(fully_padded=False)
    torch.manual_seed(1)
    out_ref = ref(x, prefix_len=PREFIX, pad_mask=pad).logits
    torch.manual_seed(1)
    with count_fused_calls() as calls:
        out = fused(x, prefix_len=PREFIX, pad_mask=pad).logits
    assert calls.attention_fwd == AR_CALLS
    assert rel(out_ref, out) < TOL
    out_ref.sum().backward()
    out.sum().backward()
    grads_match(ref, fused)


def test_causal_sequence_model_kv_cache_generation():
    """A prompt fills the kv caches, then one token decodes against them (N = 1 query, bottom-right causal)."""
    ref, fused = pair(causal_model(), krasserm.KIND, AR_CALLS)
    ref.eval(), fused.eval()
    x, pad = ar_inputs(fully_padded=False)
    step = torch.randint(VOCAB, (B, 1))
    pad_step = torch.cat([pad, torch.zeros(B, 1, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        r1 = ref(x, prefix_len=PREFIX, pad_mask=pad, kv_cache=[])
        r2 = ref(step, prefix_len=PREFIX, pad_mask=pad_step, kv_cache=r1.kv_cache)
        with count_fused_calls() as calls:
            f1 = fused(x, prefix_len=PREFIX, pad_mask=pad, kv_cache=[])
            f2 = fused(step, prefix_len=PREFIX, pad_mask=pad_step, kv_cache=f1.kv_cache)
    assert calls.attention_fwd == 2 * AR_CALLS  # prompt + one decoding step
    for a, b in [(r1.logits, f1.logits), (r2.logits, f2.logits)]:
        assert rel(a, b) < TOL
    assert len(r2.kv_cache) == len(f2.kv_cache) == AR_CALLS
    for (rk, rv), (fk, fv) in zip(r2.kv_cache, f2.kv_cache):
        assert rk.shape == fk.shape and rel(rk, fk) < TOL and rel(rv, fv) < TOL


# ---------------------------------------------------------------------------------------------------------------
# krasserm: what falls back, and the module-level semantics
# ---------------------------------------------------------------------------------------------------------------
def attention_module(**kw):
    c = core()
    args = dict(num_heads=2, num_q_input_channels=8, num_kv_input_channels=6, num_qk_channels=8, num_v_channels=12)
    args.update(kw)
    return c.MultiHeadAttention(**args)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n,m", [(3, 5), (5, 3), (4, 4)])
def test_multi_head_attention_rows_without_keys(causal, n, m, masked):
    """All keys padded, or causal with more queries than keys: the package's uniform average of all values."""
    ref, fused = pair(attention_module(causal_attention=causal, max_heads_parallel=1), krasserm.KIND, 1)
    x_q = torch.randn(2, n, 8, requires_grad=True)
    x_kv = torch.randn(2, m, 6, requires_grad=True)
    pad = torch.zeros(2, m, dtype=torch.bool)
    pad[0] = True
    pad[1, 0] = True
    pad = pad if masked else None
    out_ref = ref(x_q, x_kv, pad_mask=pad).last_hidden_state
    with count_fused_calls() as calls:
        out = fused(x_q, x_kv, pad_mask=pad).last_hidden_state
    assert calls.attention_fwd == 1
    assert rel(out_ref, out) < TOL
    g_ref = torch.autograd.grad(out_ref.square().sum(), (x_q, x_kv))
    g = torch.autograd.grad(out.square().sum(), (x_q, x_kv))
    for a, b in zip(g_ref, g):
        assert rel(a, b) < TOL


def test_multi_head_attention_float64_falls_back():
    ref, fused = pair(attention_module().double(), krasserm.KIND, 1)
    x_q, x_kv = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)
    with count_fused_calls() as calls:
        out = fused(x_q, x_kv).last_hidden_state
    assert calls.attention_fwd == 0
    assert torch.equal(out, ref(x_q, x_kv).last_hidden_state)


def test_multi_head_attention_dropout_in_training():
    """Attention dropout (train mode only) is fused, unless a query has no key: the package drops entries of the
    uniform row there, so that call falls back (one host-side check)."""
    _, fused = pair(attention_module(dropout=0.5), krasserm.KIND, 1)
    x_q, x_kv = torch.randn(2, 3, 8), torch.randn(2, 4, 6)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    pad[1, :2] = True
    with count_fused_calls() as calls:
        fused(x_q, x_kv, pad_mask=pad)  # train: fused with dropout
        pad[0] = True
        fused(x_q, x_kv, pad_mask=pad)  # train, a fully padded sample: falls back
        fused.eval()
        out = fused(x_q, x_kv, pad_mask=pad).last_hidden_state  # eval: no dropout, fused
    assert calls.attention_fwd == 2
    fused.eval()
    ref = unpatch_model(copy.deepcopy(fused))
    assert rel(ref(x_q, x_kv, pad_mask=pad).last_hidden_state, out) < TOL


def test_state_dict_round_trip_and_unpatch():
    ref, fused = pair(perceiver_io(), krasserm.KIND, IO_MODULES)
    assert list(ref.state_dict()) == list(fused.state_dict())
    x, pad = io_inputs()
    # patched -> unpatched, and unpatched -> patched
    fresh = perceiver_io()
    fresh.load_state_dict(fused.state_dict())
    fresh_fused = perceiver_io()
    patch_model(fresh_fused)
    fresh_fused.load_state_dict(ref.state_dict())
    with torch.no_grad():
        expected = run_io(ref, x, pad)
        assert rel(expected, run_io(fresh, x, pad)) < TOL
        assert rel(expected, run_io(fresh_fused, x, pad)) < TOL
        unpatch_model(fused)
        assert not any(is_fused_forward(m.__dict__.get("forward")) for m in fused.modules())
        with count_fused_calls() as calls:
            out = run_io(fused, x, pad)
    assert calls.attention_fwd == 0
    assert torch.equal(out, expected)


def test_patch_classes_covers_new_instances():
    with patch_classes([krasserm.KIND]) as handle:
        assert handle.kinds == [krasserm.KIND]
        model = perceiver_io()
        with count_fused_calls() as calls, torch.no_grad():
            run_io(model, *io_inputs())
        assert calls.attention_fwd == IO_CALLS
        assert patch_model(model).patched.get(krasserm.KIND) is None  # already patched by its class
    with count_fused_calls() as calls, torch.no_grad():
        run_io(model, *io_inputs())
    assert calls.attention_fwd == 0


# ---------------------------------------------------------------------------------------------------------------
# pio-arch (torch.nn.MultiheadAttention)
# ---------------------------------------------------------------------------------------------------------------
def pio_model(skip_latent_bottleneck: bool = False):
    pia = pytest.importorskip(
        "pio_arch.models.pio_attention",
        reason="pio-arch is not installed (CI: pip install --no-deps --ignore-requires-python pio-arch==0.2.6 numpy)")
    from pio_arch.models.sentence_encoder import TaskSpec

    return pia.PIOAttentionModel(
        input_dim=5, tasks=[TaskSpec("a", "binary"), TaskSpec("b", "regression")], model_dim=8, num_latents=3,
        num_context_self_attn_blocks=1, num_latent_self_attn_blocks=1, num_task_self_attn_blocks=1,
        skip_latent_bottleneck=skip_latent_bottleneck, num_heads=2, ff_hidden_dim=8, head_hidden_dim=8)


def patch_pio(model: nn.Module) -> int:
    """patch_model where a registered patch covers nn.MultiheadAttention, else patch_multihead_attention."""
    n = patch_model(model).total
    return n if n else patch_multihead_attention(model).num_patched


def unpatch_pio(model: nn.Module) -> None:
    unpatch_model(model)
    unpatch_multihead_attention(model)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("skip", [False, True], ids=["bottleneck", "skip-bottleneck"])
def test_pio_attention_model_matches_unpatched(train, skip):
    ref = pio_model(skip_latent_bottleneck=skip)
    fused = copy.deepcopy(ref)
    # Bottleneck: context self-attention, latent cross-attention, latent self-attention, task cross-attention, task
    # self-attention. Skipping the bottleneck drops the two latent ones.
    calls_per_forward = 3 if skip else 5
    assert patch_pio(fused) == calls_per_forward  # one call per module per forward
    ref.train(train), fused.train(train)
    context = torch.randn(B, 4, 5)
    pad = torch.zeros(B, 4, dtype=torch.bool)
    pad[0] = True  # fully padded: pio-arch's safe mask keeps its first row attendable
    pad[1, 2:] = True
    out_ref = ref(context, pad)
    with count_fused_calls() as calls:
        out = fused(context, pad)
    assert calls.attention_fwd == calls_per_forward
    loss_ref = sum(v.square().sum() for v in out_ref.values())
    loss = sum(v.square().sum() for v in out.values())
    for name in out_ref:
        assert rel(out_ref[name], out[name]) < TOL
    loss_ref.backward()
    loss.backward()
    grads_match(ref, fused)
    # state_dict round trip and unpatch
    assert list(ref.state_dict()) == list(fused.state_dict())
    back = pio_model(skip_latent_bottleneck=skip)
    back.load_state_dict(fused.state_dict())
    back.train(train)
    unpatch_pio(fused)
    with torch.no_grad(), count_fused_calls() as calls:
        a, b = back(context, pad), fused(context, pad)
    assert calls.attention_fwd == 0
    for name in a:
        assert torch.equal(a[name], b[name])
