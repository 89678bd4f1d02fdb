"""Layers: projection folding, the packed self-attention block, preprocessors, decoder, bad configs."""
import math

import pytest
import torch
from torch import nn

from perceiver_fast.layers import (
    MLP,
    ClassificationDecoder,
    CrossAttention,
    CrossAttentionLayer,
    ImagePreprocessor,
    PatchEmbedding,
    SelfAttentionBlock,
    TrainablePositionEncoding,
    folding_flops,
)
from perceiver_fast.layers.attention import choose_folding
from perceiver_fast.ops.reference import fourier_encode_reference


def _pair(cls, *args, **kwargs):
    """Two modules with the same weights: (fused, eager)."""
    a = cls(*args, attention="fused", **kwargs)
    b = cls(*args, attention="eager", **kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


def _naive_cross(mod: CrossAttention, q, kv, mask=None):
    """HF PerceiverAttention written out in float64 (the oracle)."""
    h = mod.heads
    qn = mod.norm_q(q)
    x = mod.norm_kv(kv)
    Q = mod.to_q(qn).unflatten(-1, (h, -1)).transpose(1, 2)
    K = mod.to_k(x).unflatten(-1, (h, -1)).transpose(1, 2)
    V = mod.to_v(x).unflatten(-1, (h, -1)).transpose(1, 2)
    s = Q @ K.transpose(-1, -2) / math.sqrt(Q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    o = (s.softmax(-1) @ V).transpose(1, 2).flatten(2)
    return mod.to_out(o) + q


@pytest.mark.parametrize("attention", ["fused", "eager"])
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("q_batch", [1, 3])
def test_cross_attention_matches_hf_formula_and_folding_is_exact(attention, heads, fold, q_batch):
    mod = CrossAttention(16, 12, heads=heads, qk_channels=8, v_channels=12, attention=attention, fold=fold)
    with torch.no_grad():  # non-trivial biases so the folding's bias algebra is exercised
        for lin in (mod.to_q, mod.to_k, mod.to_v):
            lin.bias.normal_()
    q = torch.randn(q_batch, 4, 16, requires_grad=True)  # q_batch 1: batch-shared latents
    kv = torch.randn(3, 10, 12, requires_grad=True)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    out = mod(q, kv, mask)
    assert out.shape == (3, 4, 16)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None}
    gq, gkv = q.grad.clone(), kv.grad.clone()

    ref = CrossAttention(16, 12, heads=heads, qk_channels=8, v_channels=12, attention="eager").double()
    ref.load_state_dict(mod.state_dict())
    q64 = q.detach().double().requires_grad_()
    kv64 = kv.detach().double().requires_grad_()
    want = _naive_cross(ref, q64, kv64, mask)
    (want * torch.linspace(-1, 1, want.numel(), dtype=torch.float64).view_as(want)).sum().backward()
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gq.double(), q64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gkv.double(), kv64.grad, rtol=1e-4, atol=1e-5)
    for name, p in ref.named_parameters():
        if name == "to_k.bias":
            # The key bias adds a per-row constant to the scores: its true gradient is 0 and
            # the folded path does not even use it.
            assert p.grad.abs().max() < 1e-10
            if fold:
                assert grads[name].abs().max() == 0  # kept in the graph with an exact zero gradient (DDP)
            continue
        torch.testing.assert_close(grads[name].double(), p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("attention", ["fused", "eager"])
def test_folding_is_exact_for_a_fully_masked_batch_element(attention):
    """Every input of batch 0 masked: the attention returns zeros there (P's rows sum to 0, not 1), so the
    folded path must not add b_v either - outputs and gradients equal the unfolded path's."""
    torch.manual_seed(0)
    mod = CrossAttention(8, 6, heads=2, qk_channels=4, attention=attention, fold=False)
    with torch.no_grad():
        mod.to_v.bias.normal_()
    q, kv = torch.randn(1, 3, 8), torch.randn(2, 5, 6)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0] = False
    mask[1, 3:] = False
    results = []
    for fold in (False, True):
        mod.fold = fold
        mod.zero_grad()
        out = mod(q, kv, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), mod.to_v.bias.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)


def test_folding_is_chosen_by_flops():
    # HF learned: N=512 latents, M=50176 inputs, Din=Dqk=Dv=512, 1 head -> fold.
    unfolded, folded = folding_flops(512, 50176, 512, 512, 512, 1)
    assert folded < unfolded
    assert choose_folding("auto", 512, 50176, 512, 512, 512, 1)
    # 8 heads over a wide input: folding multiplies the attention by H*Din/Dqk -> don't.
    assert not choose_folding("auto", 512, 50176, 512, 512, 512, 8)
    assert not choose_folding(False, 512, 50176, 512, 512, 512, 1)
    assert choose_folding(True, 512, 50176, 512, 512, 512, 8)
    # Beyond the cross-attention kernel's head-dim limit: never folded automatically.
    assert not choose_folding("auto", 512, 50176, 5000, 5000, 5000, 1)
    mod = CrossAttention(1024, 512, heads=1)
    assert mod.use_folding(512, 50176)


@pytest.mark.parametrize("heads", [1, 2])
def test_folding_with_dropout_is_exact(monkeypatch, heads):
    """Same dropout mask in both paths (a deterministic stand-in for the op's RNG): folded == unfolded."""
    from perceiver_fast.layers import dispatch

    b, n, m, p = 2, 3, 6, 0.4
    keep = torch.rand(b, heads, n, m, generator=torch.Generator().manual_seed(1)) >= p

    def attention_with_fixed_dropout(q, k, v, *, attention, key_padding_mask=None, dropout_p=0.0,
                                     softmax_scale=None):
        assert dropout_p == p
        if k.shape[2] == 1 and heads > 1:  # folded: heads stacked along the queries
            q = q.reshape(q.shape[0], heads, n, q.shape[-1]).transpose(1, 2)
            k, v = k.expand(-1, -1, heads, -1), v.expand(-1, -1, heads, -1)
            folded_heads = True
        else:
            folded_heads = False
        s = torch.einsum("bnhd,bmhd->bhnm", q, k) * softmax_scale
        probs = s.softmax(-1) * keep / (1 - p)
        o = torch.einsum("bhnm,bmhd->bnhd", probs, v)
        return o.transpose(1, 2).reshape(b, heads * n, 1, -1) if folded_heads else o

    monkeypatch.setattr(dispatch, "cross_attention", attention_with_fixed_dropout)
    outs = []
    for fold in (True, False):
        torch.manual_seed(0)
        mod = CrossAttention(8, 6, heads=heads, qk_channels=4, dropout=p, attention="eager", fold=fold).train()
        with torch.no_grad():
            mod.to_v.bias.normal_()
        q, kv = torch.randn(1, n, 8), torch.randn(b, m, 6)
        outs.append(mod(q, kv))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_folding_with_dropout_runs_the_fused_op():
    mod = CrossAttention(8, 6, heads=1, dropout=0.5, fold=True).train()
    out = mod(torch.randn(1, 3, 8), torch.randn(2, 5, 6))
    out.sum().backward()
    assert torch.isfinite(out).all() and mod.to_v.bias.grad is not None


def test_folded_path_calls_attention_once_with_stacked_heads(monkeypatch):
    from perceiver_fast.layers import dispatch

    calls = []
    real = dispatch.cross_attention

    def spy(q, k, v, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), k.data_ptr() == v.data_ptr()))
        return real(q, k, v, **kw)

    monkeypatch.setattr(dispatch, "cross_attention", spy)
    mod = CrossAttention(8, 6, heads=2, qk_channels=4, attention="eager", fold=True)
    mod(torch.randn(1, 3, 8), torch.randn(2, 5, 6))
    assert calls == [((1, 6, 1, 6), (2, 5, 1, 6), True)]  # q'' (Bq, H*N, 1, Din), keys = values = LN(x)


def test_cross_attention_layer_and_decoder_fused_equals_eager():
    a, b = _pair(CrossAttentionLayer, 16, 12, heads=2, widening_factor=2)
    q, kv = torch.randn(1, 3, 16), torch.randn(2, 7, 12)
    torch.testing.assert_close(a(q, kv), b(q, kv), rtol=1e-4, atol=1e-5)
    a, b = _pair(ClassificationDecoder, 16, 5)
    z = torch.randn(2, 6, 16)
    out = a(z)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, b(z), rtol=1e-4, atol=1e-5)


def test_self_attention_block_passes_strided_views_and_matches_mha(monkeypatch):
    from perceiver_fast.layers import dispatch

    seen = []
    real = dispatch.self_attention

    def spy(q, k, v, **kw):
        seen.append((q.is_contiguous(), q.stride(), k.data_ptr() - q.data_ptr()))
        return real(q, k, v, **kw)

    monkeypatch.setattr(dispatch, "self_attention", spy)
    blk, ref = _pair(SelfAttentionBlock, 16, heads=2, mlp_ratio=2)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = blk(x)
    assert not seen[0][0] and seen[0][1] == (5 * 48, 48, 8, 1)  # a view of the (B, N, 3, H, D) projection
    assert seen[0][2] == 16 * x.element_size()  # k starts one (H*D) slice after q: same storage
    # Oracle: torch's MultiheadAttention with the same weights.
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(blk.qkv.weight)
        mha.in_proj_bias.copy_(blk.qkv.bias)
        mha.out_proj.weight.copy_(blk.proj.weight)
        mha.out_proj.bias.copy_(blk.proj.bias)
    xn = blk.norm(x)
    h = x + mha(xn, xn, xn, need_weights=False)[0]
    want = h + blk.mlp(blk.norm_mlp(h))
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    g1 = torch.autograd.grad(y.square().sum(), x)[0]
    g2 = torch.autograd.grad(ref(x).square().sum(), x)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


def test_preprocessors_shapes_and_fourier_channels():
    x = torch.randn(2, 3, 8, 8)
    learned = ImagePreprocessor("learned", image_size=8, in_channels=3, out_channels=6, pos_channels=4)
    assert learned(x).shape == (2, 64, 10) and learned.num_channels == 10
    fourier = ImagePreprocessor("fourier", image_size=8, in_channels=3, num_bands=4)
    out = fourier(x)
    assert out.shape == (2, 64, 3 + 2 + 2 * 2 * 4) and fourier.num_channels == out.shape[-1]
    torch.testing.assert_close(out, fourier_encode_reference(x.permute(0, 2, 3, 1), 4, max_resolution=(8, 8)))
    conv = ImagePreprocessor("conv", image_size=16, in_channels=3, out_channels=5, num_bands=3,
                             max_resolution=(4, 4))
    assert conv.grid == (3, 3)  # 16 -> conv/2 (same) 8 -> maxpool 3/2 -> 3
    assert conv(torch.randn(2, 3, 16, 16)).shape == (2, 9, conv.num_channels)
    assert TrainablePositionEncoding((2, 3), 4)().shape == (6, 4)
    assert PatchEmbedding(8, 2, 1, 12)(torch.randn(2, 1, 8, 8)).shape == (2, 16, 12)


def test_mlp_is_exact_gelu():
    mlp = MLP(4, 8)
    x = torch.randn(3, 4)
    torch.testing.assert_close(mlp(x), mlp.fc2(0.5 * mlp.fc1(x) * (1 + torch.erf(mlp.fc1(x) / math.sqrt(2)))))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: CrossAttention(16, 12, heads=5), "divisible by heads"),
        (lambda: CrossAttention(16, 12, heads=2, v_channels=9), "v_channels"),
        (lambda: CrossAttention(16, 12, attention="flash"), "attention must be one of"),
        (lambda: CrossAttention(16, 12, fold="yes"), "fold must be"),
        (lambda: SelfAttentionBlock(10, heads=4), "divisible by heads"),
        (lambda: PatchEmbedding(10, 3), "divisible by patch_size"),
        (lambda: ImagePreprocessor("patches"), "preprocessing must be one of"),
        (lambda: ImagePreprocessor("conv", image_size=4), "too small"),
        (lambda: ClassificationDecoder(8, 0), "num_classes"),
    ],
)
def test_bad_layer_configs(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_inputs():
    mod = CrossAttention(8, 6, attention="eager")
    with pytest.raises(ValueError, match="kv channels 6"):
        mod(torch.randn(1, 2, 8), torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="batch"):
        mod(torch.randn(3, 2, 8), torch.randn(2, 3, 6))
    pre = ImagePreprocessor("fourier", image_size=8, in_channels=3, num_bands=2)
    with pytest.raises(ValueError, match="size"):
        pre(torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match="channels"):
        pre(torch.randn(1, 1, 8, 8))


def test_self_attention_block_wide_heads_use_the_cross_attention_kernel():
    blk, ref = _pair(SelfAttentionBlock, 8, heads=1, dim_head=264, mlp_ratio=1)  # > the self kernel's 256
    x = torch.randn(1, 3, 8)
    torch.testing.assert_close(blk(x), ref(x), rtol=1e-4, atol=1e-5)
