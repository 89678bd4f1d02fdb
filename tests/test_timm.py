"""patch_timm_vit: against a hand-built module with timm's Attention structure (always), and real timm (if importable)."""
import pytest
import torch
from torch import nn

from perceiver_fast.integrations import patch_timm_vit, unpatch_timm_vit, vit_from_timm


class TimmLikeAttention(nn.Module):
    """timm.models.vision_transformer.Attention's attributes and its non-fused forward."""

    def __init__(self, dim, num_heads=2, qkv_bias=True, qk_norm=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = False
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            attn = attn + attn_mask
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class TinyViTLike(nn.Module):
    def __init__(self, dim=16, depth=2, qk_norm=False):
        super().__init__()
        self.blocks = nn.ModuleList(TimmLikeAttention(dim, qk_norm=qk_norm) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))

    def forward(self, x, attn_mask=None):
        for norm, attn in zip(self.norms, self.blocks):
            x = x + attn(norm(x), attn_mask=attn_mask)
        return x


@pytest.mark.parametrize("qk_norm", [False, True])
def test_patch_matches_unpatched_logits_and_grads(qk_norm):
    model = TinyViTLike(qk_norm=qk_norm)
    x = torch.randn(2, 5, 16)
    want = model(x)
    g_want = torch.autograd.grad(want.square().sum(), list(model.parameters()))
    keys = list(model.state_dict())
    patch_timm_vit(model)
    assert list(model.state_dict()) == keys
    got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    g_got = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_patch_passes_strided_views_and_falls_back_on_masks(monkeypatch):
    from perceiver_fast.layers import _dispatch

    seen = []
    real = _dispatch.self_attention

    def spy(q, k, v, **kw):
        seen.append(q.is_contiguous())
        return real(q, k, v, **kw)

    monkeypatch.setattr(_dispatch, "self_attention", spy)
    model = patch_timm_vit(TinyViTLike(depth=1), attention="eager")
    x = torch.randn(1, 4, 16)
    model(x)
    assert seen == [False]  # a strided view of the packed qkv projection
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 3] = float("-inf")
    out = model(x, attn_mask=mask)  # timm's own forward
    assert len(seen) == 1
    unpatch_timm_vit(model)
    torch.testing.assert_close(out, model(x, attn_mask=mask))
    assert "forward" not in model.blocks[0].__dict__



class BeitLikeAttention(TimmLikeAttention):
    """BEiT/EVA-style: the q/v biases are parameters of the attention module, added outside the qkv Linear."""

    def __init__(self, dim, num_heads=2):
        super().__init__(dim, num_heads, qkv_bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.v_bias = nn.Parameter(torch.randn(dim))

    def forward(self, x, attn_mask=None):
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = nn.functional.linear(x, self.qkv.weight, bias)
        B, N, C = x.shape
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def test_patch_leaves_attention_with_its_own_parameters_alone():
    """Modules that look like timm's Attention but hold parameters of their own (BEiT's q/v bias, relative
    position tables) would lose them in the fused forward: they are not patched."""
    model = TinyViTLike(depth=2)
    model.blocks[0] = BeitLikeAttention(16)
    x = torch.randn(2, 5, 16)
    want = model(x)
    patch_timm_vit(model)
    assert "forward" not in model.blocks[0].__dict__ and "forward" in model.blocks[1].__dict__
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no timm Attention"):
        patch_timm_vit(BeitLikeAttention(16))

def test_patch_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = patch_timm_vit(TinyViTLike(depth=1))
    x = torch.randn(1, 4, 16)
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


def test_patch_rejects_models_without_attention():
    with pytest.raises(ValueError, match="no timm Attention"):
        patch_timm_vit(nn.Linear(2, 2))


def _real_timm_vit():
    timm_vit = pytest.importorskip("timm.models.vision_transformer", reason="timm is not installed here")
    model = timm_vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                       num_classes=5).eval()
    return model, torch.randn(2, 3, 16, 16)


def test_real_timm_vision_transformer():
    model, x = _real_timm_vit()
    with torch.no_grad():
        want = model(x)
        patch_timm_vit(model)
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    model.train()
    model(x).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


class TimmLikeBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmLikeAttention(dim, heads)
        self.ls1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.ls2 = nn.Identity()

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(self.mlp.act(self.mlp.fc1(self.norm2(x))))


class TimmLikeViT(nn.Module):
    """timm VisionTransformer's parameter names and forward (class token, token pooling)."""

    def __init__(self, img=8, patch=4, chans=1, dim=16, depth=2, heads=2, classes=5):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.img_size, self.patch_embed.patch_size = (img, img), (patch, patch)
        self.patch_embed.proj = nn.Conv2d(chans, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[TimmLikeBlock(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc_norm = nn.Identity()
        self.head = nn.Linear(dim, classes)
        self.global_pool = "token"

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def test_vit_from_timm_structure():
    timm_like = TimmLikeViT().eval()
    x = torch.randn(2, 1, 8, 8)
    ours = vit_from_timm(timm_like)
    torch.testing.assert_close(ours(x), timm_like(x), rtol=1e-4, atol=1e-5)
    timm_like.global_pool = "avg"
    with pytest.raises(ValueError, match="global_pool"):
        vit_from_timm(timm_like)



def test_vit_from_timm_refuses_what_it_cannot_convert_and_keeps_dropout():
    """A patch-embedding norm or a post-norm block (same parameter names, other maths) must be refused, not
    silently converted; the dropout rates carry over to the converted model."""
    timm_like = TimmLikeViT()
    timm_like.pos_drop = nn.Dropout(0.3)
    for blk in timm_like.blocks:
        blk.attn.attn_drop.p, blk.attn.proj_drop.p = 0.2, 0.1
    ours = vit_from_timm(timm_like)
    assert ours.emb_drop.p == 0.3
    assert ours.blocks[0].dropout == 0.2 and ours.blocks[0].proj_drop.p == 0.1

    timm_like = TimmLikeViT()
    timm_like.patch_embed.norm = nn.LayerNorm(16)
    with pytest.raises(ValueError, match="patch_embed.norm"):
        vit_from_timm(timm_like)

    class ResPostBlock(TimmLikeBlock):  # timm's post-norm block: x + norm1(attn(x))
        def forward(self, x):
            x = x + self.norm1(self.attn(x))
            return x + self.norm2(self.mlp.fc2(self.mlp.act(self.mlp.fc1(x))))

    timm_like = TimmLikeViT()
    timm_like.blocks[1] = ResPostBlock(16, 2, 32)
    with pytest.raises(ValueError, match="ResPostBlock"):
        vit_from_timm(timm_like)

def test_vit_from_real_timm():
    model, x = _real_timm_vit()
    with torch.no_grad():
        torch.testing.assert_close(vit_from_timm(model)(x), model(x), rtol=1e-4, atol=1e-5)
