"""patch_timm_vit and vit_from_timm against real timm models (timm installed with --no-deps; helpers.import_timm
stubs torchvision, which timm's ViT never calls), plus hand-built modules for what real timm cannot show."""
import copy

import pytest
import torch
from torch import nn

from helpers import count_fused_calls, import_timm
from perceiver_fast.integrations import patch_timm_vit, unpatch_timm_vit, vit_from_timm

DEPTH = 2


def _timm_vit(**overrides):
    """timm's vit_tiny_patch16_224 shrunk for the Triton interpreter: 32 px (4 patches + cls), 2 blocks."""
    timm = import_timm()
    kwargs = dict(pretrained=False, img_size=32, depth=DEPTH, num_classes=5)
    kwargs.update(overrides)
    return timm.create_model("vit_tiny_patch16_224", **kwargs).eval()


def _images(dtype=torch.float32):
    return torch.randn(2, 3, 32, 32, dtype=dtype)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_real_timm_vit_runs_fused_once_per_block(qk_norm):
    """timm's blocks call attn(x, attn_mask=None, is_causal=False): the patch must take those calls (one fused op
    per block), give timm's logits and timm's gradients."""
    model = _timm_vit(qk_norm=qk_norm)
    patched = patch_timm_vit(copy.deepcopy(model))
    assert list(patched.state_dict()) == list(model.state_dict())
    x = _images()
    with count_fused_calls() as calls:
        got = patched(x)
    assert calls.attention_fwd == DEPTH
    want = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    g_got = torch.autograd.grad(got.square().sum(), list(patched.parameters()))
    g_want = torch.autograd.grad(want.square().sum(), list(model.parameters()))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_real_timm_training_with_dropout():
    model = patch_timm_vit(_timm_vit(attn_drop_rate=0.1)).train()
    with count_fused_calls() as calls:
        loss = model(_images()).square().mean()
    assert calls.attention_fwd == DEPTH
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_real_timm_passes_strided_views(monkeypatch):
    from perceiver_fast.layers import dispatch

    seen = []
    real = dispatch.self_attention

    def spy(q, k, v, **kw):
        seen.append(q.is_contiguous())
        return real(q, k, v, **kw)

    monkeypatch.setattr(dispatch, "self_attention", spy)
    patch_timm_vit(_timm_vit(depth=1), attention="eager")(_images())
    assert seen == [False]  # a strided view of the packed qkv projection


@pytest.mark.parametrize("call", ["mask", "bool-mask", "causal"])
def test_real_timm_attention_falls_back_for_what_the_kernel_cannot_do(call):
    """A real mask or is_causal=True runs timm's own forward (not the fused op) and gives timm's answer."""
    attn = _timm_vit(depth=1).blocks[0].attn
    x = torch.randn(2, 5, attn.qkv.in_features)
    if call == "mask":
        kwargs = dict(attn_mask=torch.zeros(2, 1, 5, 5).index_fill_(-1, torch.tensor([3]), -30.0))
    elif call == "bool-mask":
        kwargs = dict(attn_mask=torch.ones(2, 1, 5, 5, dtype=torch.bool).index_fill_(-1, torch.tensor([4]), False))
    else:
        kwargs = dict(is_causal=True)
    want = attn(x, **kwargs)
    patched = patch_timm_vit(copy.deepcopy(attn))
    with count_fused_calls() as calls:
        got = patched(x, **kwargs)
        plain = patched(x, attn_mask=None, is_causal=False)
    assert calls.attention_fwd == 1  # only the plain call
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain, attn(x), rtol=1e-4, atol=1e-5)
    unpatch_timm_vit(patched)
    assert "forward" not in patched.__dict__


def test_real_timm_float64_runs_timms_code():
    model = _timm_vit().double()
    patched = patch_timm_vit(copy.deepcopy(model))
    x = _images(torch.float64)
    with count_fused_calls() as calls:
        got = patched(x)
    assert calls.attention_fwd == 0
    torch.testing.assert_close(got, model(x))


def test_real_timm_gated_attention():
    """timm's gated attention scales the heads' output by sigmoid(gate(x)); the gate is a sub-module, so the
    attention still holds no parameters of its own and is patched - the gate must be applied."""
    from timm.layers import Attention

    attn = Attention(16, num_heads=2, qkv_bias=True, gated=True).eval()
    x = torch.randn(2, 5, 16)
    patched = patch_timm_vit(copy.deepcopy(attn))
    with count_fused_calls() as calls:
        got = patched(x)
    assert calls.attention_fwd == 1
    torch.testing.assert_close(got, attn(x), rtol=1e-4, atol=1e-5)


def test_patch_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = patch_timm_vit(_timm_vit(depth=1))
    x = _images()
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


class BeitLikeAttention(nn.Module):
    """BEiT/EVA-style: timm's Attention attributes, but q/v biases that are parameters of the attention module,
    added outside the qkv Linear."""

    def __init__(self, dim, num_heads=2):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, x, attn_mask=None, is_causal=False):
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = nn.functional.linear(x, self.qkv.weight, bias)
        B, N, C = x.shape
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def test_patch_leaves_attention_with_its_own_parameters_alone():
    """Modules that look like timm's Attention but hold parameters of their own (BEiT's q/v bias, relative
    position tables) would lose them in the fused forward: they are not patched."""
    model = _timm_vit()
    model.blocks[0].attn = BeitLikeAttention(model.embed_dim, num_heads=3)
    x = _images()
    want = model(x)
    with count_fused_calls() as calls:
        got = patch_timm_vit(model)(x)
    assert calls.attention_fwd == DEPTH - 1
    assert "forward" not in model.blocks[0].attn.__dict__ and "forward" in model.blocks[1].attn.__dict__
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no timm Attention"):
        patch_timm_vit(BeitLikeAttention(16))


def test_patch_rejects_models_without_attention():
    with pytest.raises(ValueError, match="no timm Attention"):
        patch_timm_vit(nn.Linear(2, 2))


def test_vit_from_real_timm():
    model = _timm_vit()
    x = _images()
    ours = vit_from_timm(model)
    assert not ours.training
    with torch.no_grad(), count_fused_calls() as calls:
        got = ours(x)
    assert calls.attention_fwd == DEPTH
    torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)


def test_vit_from_timm_keeps_dropout():
    ours = vit_from_timm(_timm_vit(pos_drop_rate=0.3, attn_drop_rate=0.2, proj_drop_rate=0.1))
    assert ours.emb_drop.p == 0.3
    assert ours.blocks[0].dropout == 0.2 and ours.blocks[0].proj_drop.p == 0.1


@pytest.mark.parametrize("overrides, match", [
    (dict(global_pool="avg"), "global_pool"),
    (dict(reg_tokens=2), "register tokens"),
    (dict(embed_norm_layer="layernorm"), "patch_embed.norm"),
    (dict(qk_norm=True), "q_norm"),
    (dict(init_values=1e-5), "ls1"),
    ("ResPostBlock", "ResPostBlock"),
])
def test_vit_from_timm_refuses_what_it_cannot_convert(overrides, match):
    """Pooling, register tokens, a patch-embedding norm, qk-norm, layer scale or post-norm blocks (same
    parameter names, other maths) are refused, not silently converted."""
    if overrides == "ResPostBlock":
        from timm.models.vision_transformer import ResPostBlock

        overrides = dict(block_fn=ResPostBlock)
    with pytest.raises(ValueError, match=match):
        vit_from_timm(_timm_vit(**overrides))
