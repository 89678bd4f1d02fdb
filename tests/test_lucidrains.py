"""lucidrains' perceiver-pytorch (Perceiver, PerceiverIO) and perceiver-ar-pytorch (PerceiverAR), patched by
patch_model / patch_classes: parity with the unpatched package on the same weights (forward and every parameter
gradient, fp32, 1e-5 relative), fused calls counted, fallbacks, state_dict round trips, unpatching."""
import copy

import pytest
import torch

pp = pytest.importorskip("perceiver_pytorch.perceiver_pytorch",
                         reason="perceiver-pytorch is not installed (CI: pip install perceiver-pytorch)")
pio = pytest.importorskip("perceiver_pytorch.perceiver_io",
                          reason="perceiver-pytorch is not installed (CI: pip install perceiver-pytorch)")
par = pytest.importorskip("perceiver_ar_pytorch.perceiver_ar_pytorch",
                          reason="perceiver-ar-pytorch is not installed (CI: pip install perceiver-ar-pytorch)")

from helpers import count_fused_calls  # noqa: E402
from perceiver_fast.integrations import patch_classes, patch_model, unpatch_model  # noqa: E402
from perceiver_fast.integrations.patching import is_fused_forward  # noqa: E402

TOL = 1e-5
B = 3


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run(model, args, kwargs, backward=True):
    torch.manual_seed(1)  # the same random draws for both models (PerceiverAR's prefix dropout)
    out = model(*args, **kwargs)
    if backward:
        (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return out


def check(ref, args, kwargs=None, *, fused, backward=True):
    """Patch a copy of ``ref``; forward (and every parameter gradient) within TOL; exactly ``fused`` fused calls."""
    kwargs = kwargs or {}
    ours = copy.deepcopy(ref)
    report = patch_model(ours)
    assert report.total > 0 and not report.left_alone
    want = run(ref, args, kwargs, backward)
    with count_fused_calls() as calls:
        got = run(ours, args, kwargs, backward)
    assert calls.attention_fwd == fused
    assert rel(got, want) <= TOL
    if backward:
        # a gradient that is zero in exact arithmetic (e.g. a LayerNorm bias whose shift the softmax cancels) is
        # rounding noise on both sides: those are held to TOL of the model's largest gradient instead
        scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
        for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                assert (q.grad - p.grad).abs().max() <= TOL * max(p.grad.abs().max().item(), 1e-4 * scale), name
    return ours, report


def padding(b=B, m=10, lengths=(10, 4, 0)):
    """(b, m) bool, True = attend: sample 0 full, sample 1 padded after 4 keys, sample 2 fully padded."""
    return torch.arange(m)[None, :] < torch.tensor(lengths[:b])[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Perceiver
# ---------------------------------------------------------------------------------------------------------------
def perceiver(depth=2, self_per_cross_attn=1, input_axis=1, **kw):
    torch.manual_seed(0)
    return pp.Perceiver(num_freq_bands=2, depth=depth, max_freq=4.0, input_channels=3, input_axis=input_axis,
                        num_latents=6, latent_dim=16, cross_heads=1, latent_heads=2, cross_dim_head=8,
                        latent_dim_head=8, num_classes=5, self_per_cross_attn=self_per_cross_attn, **kw)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("masked", [False, True])
def test_perceiver_parity(mode, masked):
    depth, spc = 2, 2
    model = perceiver(depth, spc).train(mode == "train")  # dropout 0
    x = torch.randn(B, 10, 3)
    kwargs = {"mask": padding()} if masked else {}
    _, report = check(model, (x,), kwargs, fused=depth * (1 + spc))  # per layer: 1 cross + spc self-attentions
    assert report.patched == {"perceiver-pytorch Attention": depth * (1 + spc)}


def test_perceiver_image_mask_and_weight_tying():
    """A 2-D input with a (B, H, W) mask (flattened by the package); tied layers are one module called depth
    times."""
    depth = 3
    model = perceiver(depth, 1, input_axis=2, weight_tie_layers=True)
    x = torch.randn(B, 3, 4, 3)
    mask = padding(m=12, lengths=(12, 5, 0)).view(B, 3, 4)
    _, report = check(model, (x,), {"mask": mask}, fused=depth * 2)  # every layer: cross + self
    assert report.patched == {"perceiver-pytorch Attention": 4}  # layer 0's two, the shared layer's two


def test_perceiver_inverted_cross_attention_falls_back():
    depth = 2
    model = perceiver(depth, 1, inverted_cross_attn=(True, False))
    check(model, (torch.randn(B, 10, 3),), {"mask": padding()}, fused=depth * 2 - 1)  # layer 0's cross: package


def test_perceiver_float64_runs_the_package():
    model = perceiver(1, 1).double()
    ours = copy.deepcopy(model)
    patch_model(ours)
    x = torch.randn(B, 10, 3, dtype=torch.float64)
    with count_fused_calls() as calls:
        got = ours(x, mask=padding())
    assert calls.attention_fwd == 0
    torch.testing.assert_close(got, model(x, mask=padding()), rtol=0, atol=0)


def test_perceiver_trains_with_dropout():
    model = perceiver(1, 1, attn_dropout=0.5).train()
    patch_model(model)
    with count_fused_calls() as calls:
        out = model(torch.randn(B, 10, 3), mask=padding())
        out.sum().backward()
    assert calls.attention_fwd == 2 and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------------------------
# The Attention module itself: queries_contribute_kv, batch-shared queries, dropout on a fully masked sample
# ---------------------------------------------------------------------------------------------------------------
def attention(context_dim=12, **kw):
    torch.manual_seed(0)
    return pp.Attention(16, context_dim, heads=2, dim_head=8, **kw)


@pytest.mark.parametrize("masked", [False, True])
def test_queries_contribute_kv(masked):
    x, ctx = torch.randn(B, 5, 16), torch.randn(B, 10, 16)
    kwargs = {"context": ctx, "mask": padding()} if masked else {"context": ctx}
    check(attention(16, queries_contribute_kv=True), (x,), kwargs, fused=1)  # the fully padded sample: its x


def test_batch_shared_queries_stay_batch_one():
    latents = torch.randn(5, 16)
    x = latents.expand(B, 5, 16)  # what repeat(latents, 'n d -> b n d') gives
    ctx = torch.randn(B, 10, 12)
    ref = attention()
    ours = copy.deepcopy(ref)
    patch_model(ours)
    seen = []
    ours.to_q.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    check(ref, (x,), {"context": ctx, "mask": padding()}, fused=1)
    ours(x, context=ctx)
    assert seen == [1]  # the queries were projected once


def test_fully_masked_sample_with_dropout_is_uniform():
    """Under dropout the fully masked sample attends every key with equal logits (the package's -finfo.max fill):
    with p -> its mean over many draws is the mean of v."""
    mod = attention(dropout=0.25).train()
    patch_model(mod)
    x, ctx = torch.randn(1, 4, 16), torch.randn(1, 10, 12)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    with torch.no_grad():
        outs = torch.stack([mod(x, context=ctx, mask=mask) for _ in range(100)])
        v = mod.to_kv(ctx).chunk(2, dim=-1)[1]
        want = mod.to_out(v.mean(1, keepdim=True).expand(1, 4, 16))
    assert (outs[0] - outs[1]).abs().max() > 0  # dropout ran
    torch.testing.assert_close(outs.mean(0), want, rtol=0, atol=0.05)


# ---------------------------------------------------------------------------------------------------------------
# PerceiverIO
# ---------------------------------------------------------------------------------------------------------------
def perceiver_io(depth=2):
    torch.manual_seed(0)
    return pio.PerceiverIO(depth=depth, dim=12, queries_dim=10, logits_dim=7, num_latents=6, latent_dim=16,
                           cross_heads=1, latent_heads=2, cross_dim_head=8, latent_dim_head=8, decoder_ff=True)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("queries", ["shared", "per-sample", None])
def test_perceiver_io_parity(mode, queries):
    depth = 2
    model = perceiver_io(depth).train(mode == "train")
    data = torch.randn(B, 10, 12)
    kwargs = {"mask": padding()}
    if queries is not None:
        kwargs["queries"] = torch.randn(5, 10) if queries == "shared" else torch.randn(B, 5, 10)
    # encoder cross-attention, one self-attention per latent block, the decoder cross-attention with queries
    _, report = check(model, (data,), kwargs, fused=1 + depth + (queries is not None))
    assert report.patched == {"perceiver-pytorch Attention": 1 + depth, "perceiver-pytorch perceiver_io Attention": 1}


# ---------------------------------------------------------------------------------------------------------------
# PerceiverAR
# ---------------------------------------------------------------------------------------------------------------
def perceiver_ar(depth=2, perceive_depth=1, **kw):
    torch.manual_seed(0)
    return par.PerceiverAR(num_tokens=20, dim=32, depth=depth, max_seq_len=16, cross_attn_seq_len=6, dim_head=32,
                           heads=2, perceive_depth=perceive_depth, **kw)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("masked", [False, True])
def test_perceiver_ar_parity(mode, masked):
    depth, perceive_depth = 2, 1
    model = perceiver_ar(depth, perceive_depth, perceive_max_heads_process=1).train(mode == "train")  # head chunks
    tokens = torch.randint(0, 20, (B, 14))
    kwargs = {"prefix_mask": padding(m=6, lengths=(6, 2, 0))} if masked else {}
    _, report = check(model, (tokens,), kwargs, fused=perceive_depth + depth)  # one call per layer
    assert report.patched == {"perceiver-ar-pytorch CausalPrefixAttention": perceive_depth,
                              "perceiver-ar-pytorch CausalAttention": depth}


def test_perceiver_ar_prefix_dropout_in_training():
    """cross_attn_dropout drops prefix positions with the package's own random draws: same draws, same answer."""
    model = perceiver_ar(1, 1, cross_attn_dropout=0.5).train()
    tokens = torch.randint(0, 20, (B, 14))
    check(model, (tokens,), {"prefix_mask": padding(m=6, lengths=(6, 2, 0))}, fused=2)


def test_perceiver_ar_trains_with_dropout():
    model = perceiver_ar(1, 1, dropout=0.25).train()  # the perceiver layer's attention dropout
    patch_model(model)
    with count_fused_calls() as calls:
        loss = model(torch.randint(1, 20, (B, 14)), prefix_mask=padding(m=6, lengths=(6, 2, 0)),
                     labels=torch.randint(1, 20, (B, 14)))
        loss.backward()
    assert calls.attention_fwd == 2 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_perceiver_ar_loss():
    model = perceiver_ar(1, 1)
    tokens = torch.randint(1, 20, (B, 14))
    check(model, (tokens,), {"labels": tokens}, fused=2)


def prefix_attention(**kw):
    torch.manual_seed(0)
    return par.CausalPrefixAttention(dim=32, dim_head=32, heads=2, **kw)


def test_prefix_mask_reaching_into_the_sequence():
    """A context_mask longer than the prefix masks sequence keys too; queries left with no key get the package's
    uniform average over all keys (every logit -finfo.max)."""
    x, ctx = torch.randn(B, 5, 32), torch.randn(B, 4, 32)
    mask = torch.ones(B, 7, dtype=torch.bool)
    mask[1, :6] = False  # sample 1: queries 0 and 1 see only masked keys
    mask[2] = False      # sample 2: queries 0..2 see only masked keys
    pos = par.RotaryEmbedding(32)(9, device="cpu")
    check(prefix_attention(), (x, ctx), {"context_mask": mask, "rotary_pos_emb": pos}, fused=1)
    # under attention dropout that cannot be expressed: the package's code
    mod = prefix_attention(dropout=0.1).train()
    patch_model(mod)
    with count_fused_calls() as calls:
        mod(x, ctx, context_mask=mask, rotary_pos_emb=pos)
        mod(x, ctx, context_mask=mask[:, :4], rotary_pos_emb=pos)
    assert calls.attention_fwd == 1  # the prefix-only mask fuses


def test_prefix_mask_broadcast_over_the_batch():
    x, ctx = torch.randn(B, 5, 32), torch.randn(B, 4, 32)
    check(prefix_attention(), (x, ctx), {"context_mask": torch.tensor([[True, False, True, True]])}, fused=1)


def test_rotary_table_of_another_dtype_runs_the_package():
    mod = par.CausalAttention(dim=32, dim_head=32, heads=2).to(torch.bfloat16)
    patch_model(mod)
    pos = par.RotaryEmbedding(32)(5, device="cpu")  # fp32: the package promotes q and k
    with count_fused_calls() as calls, pytest.raises(RuntimeError):
        mod(torch.randn(B, 5, 32, dtype=torch.bfloat16), rotary_pos_emb=pos)  # and fails, as unpatched
    assert calls.attention_fwd == 0


# ---------------------------------------------------------------------------------------------------------------
# state_dict, unpatching, patch_classes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [perceiver, perceiver_io, perceiver_ar])
def test_state_dict_round_trip(build):
    plain = build()
    patched = build()
    patch_model(patched)
    with torch.no_grad():
        for p in patched.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert list(plain.state_dict()) == list(patched.state_dict())
    plain.load_state_dict(patched.state_dict())  # patched -> unpatched
    for a, b in zip(plain.state_dict().values(), patched.state_dict().values()):
        assert torch.equal(a, b)
    fresh = build()
    patch_model(fresh)
    fresh.load_state_dict(plain.state_dict())  # unpatched -> patched
    for a, b in zip(plain.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_unpatch_model_restores_the_package():
    model = perceiver_ar(1, 1)
    tokens = torch.randint(0, 20, (B, 14))
    patch_model(model)
    unpatch_model(model)
    assert all("forward" not in vars(m) for m in model.modules())
    with count_fused_calls() as calls:
        model(tokens)
    assert calls.attention_fwd == 0


def test_patch_classes_context_manager():
    before = perceiver_io(1)
    data, queries = torch.randn(B, 10, 12), torch.randn(5, 10)
    with patch_classes() as handle:
        assert {"perceiver-pytorch Attention", "perceiver-ar-pytorch CausalAttention"} <= set(handle.kinds)
        born = perceiver_io(1)  # a future instance
        with torch.no_grad(), count_fused_calls() as calls:
            before(data, queries=queries)
            born(data, queries=queries)
        assert calls.attention_fwd == 2 * 3  # encoder cross, 1 self-attention, decoder cross, per model
        assert patch_model(born).total == 0  # already fused through its class: left alone, with the reason
    with torch.no_grad(), count_fused_calls() as calls:
        born(data, queries=queries)
    assert calls.attention_fwd == 0
    assert not is_fused_forward(pp.Attention.forward) and not is_fused_forward(par.CausalAttention.forward)
