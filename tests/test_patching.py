"""The patch_model / unpatch_model / patch_classes framework: the report (kinds and counts, modules left alone
with the reason), idempotence, undo, the AttentionPatch contract, and the whole-model integrations it runs
(nn.MultiheadAttention, timm attention, transformers' Perceiver) next to a class patch in one model."""
import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import count_fused_calls, import_timm
from perceiver_fast.integrations import PatchReport, patch_classes, patch_model, unpatch_model
from perceiver_fast.integrations.patching import (
    ATTENTION_PATCHES,
    MODEL_PATCHES,
    AttentionPatch,
    is_fused_forward,
)

try:  # at collection: before any test stubs torchvision for timm (transformers reads its version)
    import transformers
except ImportError:  # pragma: no cover
    transformers = None

pp = pytest.importorskip("perceiver_pytorch.perceiver_pytorch",
                         reason="perceiver-pytorch is not installed (CI: pip install perceiver-pytorch)")

PP = "perceiver-pytorch Attention"
MHA = "torch.nn.MultiheadAttention"
TIMM = "timm Attention"
HF = "transformers PerceiverSelfAttention"


class TimmLikeAttention(nn.Module):
    """timm's Attention structure (qkv, num_heads, head_dim, scale, q_norm, k_norm, attn_drop, proj, proj_drop)."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, x, attn_mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, c)))


class OwnForward(pp.Attention):
    """A subclass with its own forward: the patch cannot know what it does."""

    def forward(self, x, context=None, mask=None, inverted_attention=False):
        return 2 * super().forward(x, context, mask, inverted_attention)


def someone_elses_forward(self, *args, **kwargs):  # e.g. a hook library's wrapper
    return pp.Attention.forward(self, *args, **kwargs)


class Mixed(nn.Module):
    """A class patch (perceiver-pytorch), nn.MultiheadAttention and a timm attention in one model, plus two
    perceiver-pytorch modules that must be left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.cross = pp.Attention(16, 12, heads=2, dim_head=8)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.vit_attn = TimmLikeAttention()
        self.own = OwnForward(16, heads=2, dim_head=8)
        self.hooked = pp.Attention(16, heads=2, dim_head=8)
        self.hooked.forward = types.MethodType(someone_elses_forward, self.hooked)

    def forward(self, x, ctx):
        x = x + self.cross(x, context=ctx)
        x = x + self.mha(x, x, x, need_weights=False)[0]
        x = x + self.vit_attn(x)
        return x + self.own(x) + self.hooked(x)


def mixed():
    torch.manual_seed(0)
    return Mixed()


def inputs():
    return torch.randn(2, 5, 16), torch.randn(2, 7, 12)


FUSED_MIXED = 3  # cross, mha, vit_attn; `own` and `hooked` run their own forwards


def test_report_and_parity_on_a_mixed_model():
    ref = mixed()
    ours = copy.deepcopy(ref)
    report = patch_model(ours)
    assert isinstance(report, PatchReport)
    assert report.patched == {PP: 1, TIMM: 1, MHA: 1} and report.total == 3
    reasons = {name: (cls, why) for name, cls, why in report.left_alone}
    assert set(reasons) == {"own", "hooked"}
    assert reasons["own"] == ("OwnForward", "OwnForward overrides forward")
    assert "replaced by someone else" in reasons["hooked"][1]
    assert "left alone: own (OwnForward)" in str(report)
    x, ctx = inputs()
    with count_fused_calls() as calls:
        got = ours(x, ctx)
    assert calls.attention_fwd == FUSED_MIXED
    want = ref(x, ctx)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_patching_twice_wraps_nothing_twice():
    model = mixed()
    patch_model(model)
    forwards = {name: m.__dict__.get("forward") for name, m in model.named_modules()}
    again = patch_model(model)
    assert again.total == 0
    reasons = {name: why for name, _, why in again.left_alone}
    assert reasons["cross"] == "already patched" and "already patched" in reasons["mha"]
    assert "already replaced" in reasons["vit_attn"]
    assert {name: m.__dict__.get("forward") for name, m in model.named_modules()} == forwards
    with count_fused_calls() as calls:
        model(*inputs())
    assert calls.attention_fwd == FUSED_MIXED


def test_unpatch_model_undoes_every_kind():
    model = mixed()
    patch_model(model)
    unpatch_model(model)
    for name, m in model.named_modules():
        if name != "hooked":  # someone else's forward stays
            assert "forward" not in vars(m), name
        assert not any(k.startswith(("_perceiver_fast", "_pf_")) for k in vars(m)), name
    with count_fused_calls() as calls:
        model(*inputs())
    assert calls.attention_fwd == 0
    assert patch_model(model).total == 3  # and it patches again


def test_kinds_select_what_is_patched():
    model = mixed()
    report = patch_model(model, kinds=[MHA])
    assert report.patched == {MHA: 1} and not report.left_alone
    assert "forward" not in vars(model.cross)
    with pytest.raises(ValueError, match="unknown kinds"):
        patch_model(model, kinds=["no such kind"])


def test_patch_classes_undo_and_context_manager():
    original = pp.Attention.forward
    handle = patch_classes([PP])
    try:
        assert handle.kinds == [PP] and is_fused_forward(pp.Attention.forward)
        assert patch_classes([PP]).kinds == []  # already patched globally: left as it is
        model = mixed()
        report = patch_model(model)
        assert ("cross", "Attention", "its class is patched globally (patch_classes)") in report.left_alone
        with count_fused_calls() as calls:
            model(*inputs())
        # cross and hooked (someone else's forward calls the class forward) run the global patch; own's super()
        # too; mha and vit_attn through patch_model
        assert calls.attention_fwd == 5
    finally:
        handle.undo()
    assert pp.Attention.forward is original
    handle.undo()  # idempotent
    assert pp.Attention.forward is original
    with patch_classes([PP]):
        assert is_fused_forward(pp.Attention.forward)
    assert pp.Attention.forward is original
    mha_forward = nn.MultiheadAttention.forward
    with patch_classes([MHA]) as mha_handle:  # nn.MultiheadAttention has a class patch too
        assert mha_handle.kinds == [MHA] and is_fused_forward(nn.MultiheadAttention.forward)
    assert nn.MultiheadAttention.forward is mha_forward
    with pytest.raises(ValueError, match="per model only"):
        patch_classes(["timm Attention"])
    with pytest.raises(ValueError, match="unknown kinds"):
        patch_classes(["no such kind"])


def test_the_attention_patch_contract():
    """A third-party patch: make_forward(original) gets the class forward and falls back to it; why_not is
    asked per instance; the class is looked up only if its module is already imported."""

    class Scaled(nn.Module):
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, x, fuse=True):
            return x * self.factor

    seen = []

    def make_forward(original):
        def forward(self, x, fuse=True):
            seen.append(fuse)
            return x * self.factor if fuse else original(self, x, fuse)
        return forward

    patch = AttentionPatch(kind="test Scaled", module=__name__, qualname="Scaled", make_forward=make_forward,
                           why_not=lambda m: "factor 0" if m.factor == 0 else None)
    ghost = AttentionPatch(kind="test ghost", module="perceiver_fast_no_such_package.sub", qualname="X",
                           make_forward=make_forward)
    Scaled.__module__ = __name__
    globals()["Scaled"] = Scaled
    try:
        model = nn.Sequential(Scaled(2.0), Scaled(0.0))
        report = patch_model(model, patches=[patch, ghost])
        assert report.patched == {"test Scaled": 1}
        assert report.left_alone == [("1", "Scaled", "factor 0")]
        assert "perceiver_fast_no_such_package" not in sys.modules and ghost.resolve() is None
        model[0](torch.ones(1), fuse=False)
        assert seen == [False]
        assert is_fused_forward(model[0].forward) and not is_fused_forward(model[1].forward)
        unpatch_model(model)
        assert "forward" not in vars(model[0])
    finally:
        del globals()["Scaled"]


def test_registries_hold_every_kind():
    kinds = {p.kind for p in ATTENTION_PATCHES} | {p.kind for p in MODEL_PATCHES}
    assert {PP, "perceiver-pytorch perceiver_io Attention", "perceiver-ar-pytorch CausalAttention",
            "perceiver-ar-pytorch CausalPrefixAttention", MHA, TIMM, HF} <= kinds


def test_real_timm_attention():
    timm = import_timm()
    torch.manual_seed(0)
    ref = timm.layers.Attention(16, num_heads=2).eval()
    ours = copy.deepcopy(ref)
    assert patch_model(ours).patched == {TIMM: 1}
    x = torch.randn(2, 5, 16)
    with count_fused_calls() as calls:
        got = ours(x)
    assert calls.attention_fwd == 1
    torch.testing.assert_close(got, ref(x), rtol=1e-5, atol=1e-6)
    unpatch_model(ours)
    assert "forward" not in vars(ours)


@pytest.mark.skipif(transformers is None, reason="transformers is not installed")
def test_hf_perceiver_through_patch_model():
    cfg = transformers.PerceiverConfig(num_latents=4, d_latents=16, num_blocks=2, num_self_attends_per_block=1,
                                       num_self_attention_heads=2, num_cross_attention_heads=1, image_size=8,
                                       num_labels=5, initializer_range=0.2, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ref = transformers.PerceiverForImageClassificationLearned(cfg).eval()
    ours = copy.deepcopy(ref)
    report = patch_model(ours)
    # the encoder cross-attention, one latent self-attention (blocks share it), the decoder cross-attention
    assert report.patched == {HF: 3}
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), count_fused_calls() as calls:
        got = ours(pixel_values=pixels).logits
    assert calls.attention_fwd == 4  # num_blocks=2 runs the shared self-attention twice
    torch.testing.assert_close(got, ref(pixel_values=pixels).logits, rtol=1e-4, atol=1e-5)
    again = patch_model(ours)
    assert again.total == 0 and len(again.left_alone) == 3
    unpatch_model(ours)
    assert {type(m) for m in ours.modules()} == {type(m) for m in ref.modules()}
