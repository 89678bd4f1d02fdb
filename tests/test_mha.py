"""patch_multihead_attention against real torch.nn.MultiheadAttention modules (every configuration the fused path
claims, and the calls that must fall back), torch's Transformer layers and transformers' Siglip2VisionModel MAP head.

Each case runs the unpatched module and a patched deep copy (same weights) on random inputs, compares the outputs
(and the gradients of every parameter and input) and asserts the exact number of fused calls.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import count_fused_calls
from perceiver_fast.integrations import patch_multihead_attention, unpatch_multihead_attention
from perceiver_fast.integrations.mha import MHAPatchReport

E, H, B, L, S = 8, 2, 2, 3, 5
MIN = torch.finfo(torch.float32).min
TOL = dict(rtol=1e-5, atol=1e-5)


def _pair(ignore_need_weights: bool = False, **kwargs):
    """(unpatched module, patched deep copy)."""
    ref = nn.MultiheadAttention(E, H, **kwargs)
    if ref.bias_k is not None:  # torch initialises them with xavier: fine, but make sure they are not zeros
        assert ref.bias_k.abs().sum() > 0
    ours = copy.deepcopy(ref)
    report = patch_multihead_attention(ours, ignore_need_weights=ignore_need_weights)
    assert isinstance(report, MHAPatchReport) and report.patched == [""] and report.skipped == {}
    assert list(ours.state_dict()) == list(ref.state_dict())
    return ref, ours


def _x(n: int, d: int, batch_first: bool, b: int = B, dtype=torch.float32) -> torch.Tensor:
    return torch.randn((b, n, d) if batch_first else (n, b, d), dtype=dtype)


def _run(module, args, kwargs, backward: bool):
    """module(*args, **kwargs) on fresh leaf copies of the float inputs (the same tensor passed twice stays one
    tensor: self-attention keeps q is k is v); returns (outputs, grads of params and input leaves)."""
    leaves = {}

    def leaf(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        if id(t) not in leaves:
            leaves[id(t)] = t.detach().clone().requires_grad_(True)
        return leaves[id(t)]

    args = [leaf(a) for a in args[:3]] + list(args[3:])  # query, key, value; masks as given
    kwargs = {k: leaf(v) if k in ("query", "key", "value") else v for k, v in kwargs.items()}
    out = module(*args, **kwargs)
    if not backward:
        return out, []
    torch.manual_seed(1)
    cot = torch.randn(out[0].shape, dtype=out[0].dtype)  # not randn_like: torch returns a transposed view
    leaves = list(module.parameters()) + list(leaves.values())
    grads = torch.autograd.grad((out[0] * cot).sum(), leaves, allow_unused=True)
    return out, list(grads)


def _check(ref, ours, args, kwargs=None, *, fused: int, backward: bool = True, equal: bool = False):
    """Run both; the patched one must run ``fused`` fused ops and give the reference's outputs and gradients
    (bit-equal when ``equal``: the call fell back)."""
    kwargs = kwargs or {}
    with count_fused_calls() as calls:
        got, g_got = _run(ours, args, kwargs, backward)
    assert calls.attention_fwd == fused
    want, g_want = _run(ref, args, kwargs, backward)
    assert isinstance(got, tuple) and len(got) == 2 and got[0].shape == want[0].shape
    assert got[0].dtype == want[0].dtype
    assert not torch.isnan(want[0]).all()
    if equal:
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(got[0], want[0], **TOL)
        if want[1] is None:
            assert got[1] is None
    for a, b in zip(g_got, g_want):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=equal)
    return got


CONFIGS = {
    "plain": {},
    "kdim-vdim": dict(kdim=6, vdim=5),
    "no-bias": dict(bias=False),
    "bias-kv": dict(add_bias_kv=True),
    "zero-attn": dict(add_zero_attn=True),
    "bias-kv-zero-attn-kdim": dict(add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=5),
}


def _padding(b: int = B, s: int = S, lengths=(S, 2)) -> torch.Tensor:
    """torch's convention: True = pad."""
    return torch.arange(s)[None, :] >= torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("mask", ["none", "bool", "float-inf", "float-min"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_configs_fuse(batch_first, config, mask):
    ref, ours = _pair(batch_first=batch_first, **CONFIGS[config])
    q, k, v = _x(L, E, batch_first), _x(S, ref.kdim, batch_first), _x(S, ref.vdim, batch_first)
    kpm = {"none": None, "bool": _padding(),
           "float-inf": torch.zeros(B, S).masked_fill(_padding(), float("-inf")),
           "float-min": torch.zeros(B, S).masked_fill(_padding(), MIN)}[mask]
    _check(ref, ours, (q, k, v), dict(key_padding_mask=kpm, need_weights=False), fused=1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["self", "kv-shared"])
@pytest.mark.parametrize("mode", ["train-grad", "eval-nograd"])
def test_self_and_encoder_decoder_attention(batch_first, kind, mode):
    """q is k is v (one packed projection) and k is v (packed kv). In eval without grad torch runs its native fast
    path (self-attention, batch_first), which the patched module must match too."""
    ref, ours = _pair(batch_first=batch_first)
    x = _x(S, E, batch_first)
    args = (x, x, x) if kind == "self" else (_x(L, E, batch_first), x, x)
    kwargs = dict(key_padding_mask=_padding(), need_weights=False)
    if mode == "train-grad":
        _check(ref.train(), ours.train(), args, kwargs, fused=1)
        return
    ref.eval().requires_grad_(False)
    ours.eval().requires_grad_(False)
    with torch.no_grad():
        _check(ref, ours, args, kwargs, fused=1, backward=False)
        with torch.profiler.profile() as prof:
            ref(*args, **kwargs)
    native = any(e.name == "aten::_native_multi_head_attention" for e in prof.events())
    assert native == (kind == "self" and batch_first)  # the reference did take torch's fast path


def test_unbatched_inputs_fuse():
    ref, ours = _pair(batch_first=True, kdim=6, vdim=5)
    q, k, v = torch.randn(L, E), torch.randn(S, 6), torch.randn(S, 5)
    kpm = torch.tensor([False, False, True, False, True])
    _check(ref, ours, (q, k, v), dict(key_padding_mask=kpm, need_weights=False), fused=1)
    per_head = torch.zeros(H, L, S).masked_fill(kpm, float("-inf"))  # (H, L, S): a key mask in disguise
    _check(ref, ours, (q, k, v), dict(attn_mask=per_head, need_weights=False), fused=1)


def test_positional_and_keyword_arguments():
    ref, ours = _pair(batch_first=True)
    q, kv = _x(L, E, True), _x(S, E, True)
    _check(ref, ours, (q, kv, kv, _padding(), False), fused=1)
    _check(ref, ours, (), dict(query=q, key=kv, value=kv, need_weights=False), fused=1)


@pytest.mark.parametrize("config", ["plain", "bias-kv", "zero-attn"])
@pytest.mark.parametrize("mask", ["bool", "float-inf", "float-min"])
def test_fully_padded_sample(config, mask):
    """A sample whose keys are all padded: torch gives the out-projection bias (SDPA path, -inf), NaN (weights path,
    native fast path) or the average of all values (finfo.min), so the call falls back (bit-equal), unless
    add_bias_kv / add_zero_attn appended a key every query attends (then it fuses)."""
    ref, ours = _pair(batch_first=True, **CONFIGS[config])
    q, kv = _x(L, E, True), _x(S, E, True)
    pad = _padding(lengths=(S, 0))
    kpm = pad if mask == "bool" else torch.zeros(B, S).masked_fill(pad, float("-inf") if mask == "float-inf" else MIN)
    extra = config != "plain"
    _check(ref, ours, (q, kv, kv), dict(key_padding_mask=kpm, need_weights=False), fused=int(extra),
           equal=not extra)


def test_torch_fully_masked_semantics():
    """What the fallback preserves, on this torch: a fully masked row gives zeros through SDPA with -inf (output =
    out_proj bias), NaN through the need_weights path, and the uniform average of the values with finfo.min."""
    ref = nn.MultiheadAttention(E, H, batch_first=True)
    q, kv = _x(L, E, True), _x(S, E, True)
    pad = _padding(lengths=(S, 0))
    inf_mask = torch.zeros(B, S).masked_fill(pad, float("-inf"))
    out = ref(q, kv, kv, key_padding_mask=inf_mask, need_weights=False)[0]
    torch.testing.assert_close(out[1], ref.out_proj.bias.detach().expand(L, E))
    assert torch.isnan(ref(q, kv, kv, key_padding_mask=inf_mask, need_weights=True)[0][1]).all()
    out = ref(q, kv, kv, key_padding_mask=torch.zeros(B, S).masked_fill(pad, MIN), need_weights=False)[0]
    values = nn.functional.linear(kv[1], ref.in_proj_weight[2 * E:], ref.in_proj_bias[2 * E:])
    uniform = ref.out_proj(values.mean(0))
    torch.testing.assert_close(out[1], uniform.expand(L, E))


@pytest.mark.parametrize("batch_first", [True, False])
def test_attn_mask_that_is_a_key_mask_fuses(batch_first):
    ref, ours = _pair(batch_first=batch_first)
    q, kv = _x(L, E, batch_first), _x(S, E, batch_first)
    pad = _padding()
    # (L, S) bool, the same for every query: pads key 4 of every sample
    shared = torch.zeros(L, S, dtype=torch.bool)
    shared[:, 4] = True
    _check(ref, ours, (q, kv, kv), dict(attn_mask=shared, need_weights=False), fused=1)
    # (B*H, L, S) float, constant over queries and heads (SigLIP2's pooling head builds this, with finfo.min)
    for fill in (float("-inf"), MIN):
        per_head = torch.zeros(B, H, L, S).masked_fill(pad[:, None, None, :], fill).reshape(B * H, L, S)
        _check(ref, ours, (q, kv, kv), dict(attn_mask=per_head, need_weights=False), fused=1)
    # both masks, float: torch adds them
    kpm = torch.zeros(B, S).masked_fill(pad, float("-inf"))
    shared_f = torch.zeros(L, S).masked_fill(shared, MIN)
    _check(ref, ours, (q, kv, kv), dict(attn_mask=shared_f, key_padding_mask=kpm, need_weights=False), fused=1)


@pytest.mark.parametrize("case", ["causal", "per-head", "soft-bias", "soft-kpm", "bool-float-mixed", "nan",
                                  "is-causal", "all-masked-attn-mask", "mask-requires-grad"])
def test_masks_the_op_cannot_express_fall_back(case):
    ref, ours = _pair(batch_first=True)
    n = S  # square, for the causal masks
    q, kv = _x(n, E, True), _x(S, E, True)
    kwargs = dict(need_weights=False)
    causal = torch.triu(torch.full((n, S), float("-inf")), diagonal=1)
    if case == "causal":
        kwargs["attn_mask"] = causal
    elif case == "per-head":
        m = torch.zeros(B, H, n, S)
        m[:, 1, :, 0] = float("-inf")
        kwargs["attn_mask"] = m.reshape(B * H, n, S)
    elif case == "soft-bias":
        kwargs["attn_mask"] = torch.randn(S).expand(n, S).contiguous()  # same for every query, but not 0/-inf
    elif case == "soft-kpm":
        kwargs["key_padding_mask"] = torch.zeros(B, S).masked_fill(_padding(), -1e4)
    elif case == "bool-float-mixed":
        kwargs["key_padding_mask"] = _padding()
        kwargs["attn_mask"] = torch.zeros(n, S)
    elif case == "nan":
        kwargs["key_padding_mask"] = torch.zeros(B, S).masked_fill(_padding(), float("nan"))
    elif case == "is-causal":
        kwargs.update(attn_mask=causal, is_causal=True)
    elif case == "all-masked-attn-mask":
        kwargs["attn_mask"] = torch.ones(n, S, dtype=torch.bool)
    elif case == "mask-requires-grad":  # torch differentiates through a float mask; the key mask would not
        kwargs["key_padding_mask"] = torch.zeros(B, S).masked_fill(_padding(), float("-inf")).requires_grad_()
    with pytest.warns(UserWarning) if case == "bool-float-mixed" else _nothing():
        _check(ref, ours, (q, kv, kv), kwargs, fused=0, equal=True)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_need_weights_falls_back_unless_ignored():
    ref, ours = _pair(batch_first=True)
    q, kv = _x(L, E, True), _x(S, E, True)
    got = _check(ref, ours, (q, kv, kv), dict(key_padding_mask=_padding()), fused=0, equal=True)  # default True
    assert got[1] is not None and got[1].shape == (B, L, S)
    _check(ref, ours, (q, kv, kv), dict(need_weights=True, average_attn_weights=False), fused=0, equal=True)

    ref, ours = _pair(ignore_need_weights=True, batch_first=True)
    with count_fused_calls() as calls:
        out, weights = ours(q, kv, kv, key_padding_mask=_padding())
    assert calls.attention_fwd == 1 and weights is None
    torch.testing.assert_close(out, ref(q, kv, kv, key_padding_mask=_padding())[0], **TOL)


def test_dropout_in_training_only():
    ref, ours = _pair(batch_first=True, dropout=0.5)
    q, kv = _x(L, E, True), _x(S, E, True)
    ref.eval()
    ours.eval()
    _check(ref, ours, (q, kv, kv), dict(need_weights=False), fused=1)  # eval: no dropout, same as torch

    ours.train()
    no_drop = copy.deepcopy(ours)
    no_drop.dropout = 0.0
    torch.manual_seed(3)
    with count_fused_calls() as calls:
        a = ours(q, kv, kv, need_weights=False)[0]
    assert calls.attention_fwd == 1
    torch.manual_seed(3)
    b = ours(q, kv, kv, need_weights=False)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # reproducible from torch's seed
    c = no_drop(q, kv, kv, need_weights=False)[0]
    assert not torch.allclose(a, c)  # dropout was applied
    a.square().sum().backward()
    assert ours.in_proj_weight.grad.abs().sum() > 0


def test_float64_and_mixed_dtypes_fall_back():
    ref, ours = _pair(batch_first=True)
    ref.double()
    ours.double()
    q, kv = _x(L, E, True, dtype=torch.float64), _x(S, E, True, dtype=torch.float64)
    _check(ref, ours, (q, kv, kv), dict(key_padding_mask=_padding(), need_weights=False), fused=0, equal=True)


def test_float16_fuses():
    """16-bit inputs fuse (bf16 is the same path; the Triton interpreter's bf16 tl.dot is wrong on CPU,
    triton-lang/triton#11584, so it is not run here). The finfo(float16).min mask is a key mask too."""
    ref, ours = _pair(batch_first=True)
    ref.half()
    ours.half()
    q, kv = _x(L, E, True, dtype=torch.float16), _x(S, E, True, dtype=torch.float16)
    kpm = torch.zeros(B, S, dtype=torch.float16).masked_fill(_padding(), torch.finfo(torch.float16).min)
    with count_fused_calls() as calls:
        got = ours(q, kv, kv, key_padding_mask=kpm, need_weights=False)[0]
    assert calls.attention_fwd == 1 and got.dtype == torch.float16
    torch.testing.assert_close(got, ref(q, kv, kv, key_padding_mask=kpm, need_weights=False)[0], rtol=1e-2,
                               atol=2e-3)


def test_autocast_falls_back():
    ref, ours = _pair(batch_first=True)
    q, kv = _x(L, E, True), _x(S, E, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _check(ref, ours, (q, kv, kv), dict(need_weights=False), fused=0, equal=True, backward=False)


def test_patch_is_idempotent_and_unpatch_restores():
    model = nn.Sequential(nn.MultiheadAttention(E, H, batch_first=True), nn.Linear(E, E))
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    first = patch_multihead_attention(model)
    assert first.patched == ["0"] and first.num_patched == 1 and first.skipped == {}
    forward = model[0].forward
    second = patch_multihead_attention(model, ignore_need_weights=True)
    assert second.patched == [] and "already patched" in second.skipped["0"]
    assert model[0].forward == forward  # not wrapped twice, options unchanged
    assert list(model.state_dict()) == keys
    q, kv = _x(L, E, True), _x(S, E, True)
    with count_fused_calls() as calls:
        got = model[0](q, kv, kv, need_weights=False)[0]
    assert calls.attention_fwd == 1
    torch.testing.assert_close(got, ref[0](q, kv, kv, need_weights=False)[0], **TOL)
    # loading a checkpoint works either way
    model.load_state_dict(ref.state_dict())
    ref.load_state_dict(model.state_dict())

    assert unpatch_multihead_attention(model) is model
    assert "forward" not in vars(model[0])
    assert type(model[0]).forward is nn.MultiheadAttention.forward
    assert list(model.state_dict()) == keys
    with count_fused_calls() as calls:
        after = model[0](q, kv, kv, need_weights=False)
    assert calls.attention_fwd == 0
    torch.testing.assert_close(after, ref[0](q, kv, kv, need_weights=False), rtol=0, atol=0)
    again = patch_multihead_attention(model)  # patchable again after unpatch
    assert again.patched == ["0"]


def test_modules_left_alone_are_reported():
    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    hooked = nn.MultiheadAttention(E, H)
    hooked.forward = lambda *a, **k: nn.MultiheadAttention.forward(hooked, *a, **k)  # e.g. accelerate's hook
    model = nn.ModuleDict({"custom": Custom(E, H), "hooked": hooked, "plain": nn.MultiheadAttention(E, H)})
    report = patch_multihead_attention(model)
    assert report.patched == ["plain"]
    assert set(report.skipped) == {"custom", "hooked"}
    assert "overrides" in report.skipped["custom"] and "instance" in report.skipped["hooked"]
    unpatch_multihead_attention(model)
    assert "forward" in vars(hooked)  # someone else's override is not touched
    assert patch_multihead_attention(nn.Linear(2, 2)).num_patched == 0


def test_transformer_encoder_and_decoder_layers():
    """TransformerEncoderLayer: self-attention with the padding mask (the layer turns it into a -inf float mask)
    fuses. TransformerDecoderLayer: causal self-attention falls back, cross-attention over the padded memory fuses.
    Grad is enabled, so the layers' own native fast paths do not bypass the attention modules."""
    enc = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True).eval()
    dec = nn.TransformerDecoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=False).eval()
    model = nn.ModuleDict({"enc": enc, "dec": dec})
    ref = copy.deepcopy(model)
    report = patch_multihead_attention(model)
    assert sorted(report.patched) == ["dec.multihead_attn", "dec.self_attn", "enc.self_attn"]
    src, pad = torch.randn(B, S, E), _padding()
    tgt = torch.randn(L, B, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)

    def run(m):
        memory = m["enc"](src, src_key_padding_mask=pad)
        return m["dec"](tgt, memory.transpose(0, 1), tgt_mask=causal, memory_key_padding_mask=pad, tgt_is_causal=True)

    with count_fused_calls() as calls:
        got = run(model)
    assert calls.attention_fwd == 2  # encoder self-attention + decoder cross-attention
    want = run(ref)
    torch.testing.assert_close(got, want, **TOL)
    g_got = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    g_want = torch.autograd.grad(want.square().sum(), list(ref.parameters()))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ transformers


def _siglip2_pair():
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "Siglip2VisionModel", None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no Siglip2VisionModel")
    cfg = transformers.Siglip2VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_channels=3, patch_size=2, num_patches=16,
                                           vision_use_head=True, attention_dropout=0.0)
    torch.manual_seed(0)
    ref = cls._from_config(cfg, attn_implementation="eager").eval()
    ours = cls._from_config(cfg, attn_implementation="eager").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _float_leaves(out):
    return [(k, v) for k, v in out.items() if torch.is_tensor(v) and v.is_floating_point()]


def _rel_err(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.mark.parametrize("padded", [True, False])
def test_siglip2_map_head(padded):
    """transformers' Siglip2VisionModel (NaFlex, padded patches): the MAP head calls
    ``self.attention(probe, h, h, attn_mask=(B*H, 1, S) finfo.min mask)[0]`` with need_weights left at True."""
    ref, ours = _siglip2_pair()
    keys = list(ours.state_dict())
    report = patch_multihead_attention(ours, ignore_need_weights=True)
    assert report.patched == ["head.attention"] and list(ours.state_dict()) == keys
    b, max_patches = 3, 16
    shapes = torch.tensor([[4, 4], [3, 3], [2, 3]]) if padded else torch.tensor([[4, 4]] * b)
    lengths = shapes.prod(-1)
    mask = (torch.arange(max_patches)[None, :] < lengths[:, None]).long()
    pixels = torch.randn(b, max_patches, 3 * 2 * 2)
    inputs = dict(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)

    with count_fused_calls() as calls:
        got = ours(**inputs)
    assert calls.attention_fwd == 1  # the MAP head; the encoder runs transformers' eager attention
    want = ref(**inputs)
    leaves_got, leaves_want = _float_leaves(got), _float_leaves(want)
    assert [k for k, _ in leaves_got] == [k for k, _ in leaves_want] and leaves_want
    assert "pooler_output" in dict(leaves_want)
    for (name, a), (_, w) in zip(leaves_got, leaves_want):
        assert a.shape == w.shape, name
        assert _rel_err(a, w) <= 1e-5, (name, _rel_err(a, w))

    g_got = torch.autograd.grad(got.pooler_output.square().sum(), list(ours.head.parameters()))
    g_want = torch.autograd.grad(want.pooler_output.square().sum(), list(ref.head.parameters()))
    for a, w in zip(g_got, g_want):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)

    # without the opt-in the head's need_weights=True call runs torch's code; after unpatch nothing fuses
    unpatch_multihead_attention(ours)
    patch_multihead_attention(ours)
    with count_fused_calls() as calls:
        plain = ours(**inputs)
    assert calls.attention_fwd == 0
    torch.testing.assert_close(plain.pooler_output, want.pooler_output, rtol=0, atol=0)
    unpatch_multihead_attention(ours)
    with count_fused_calls() as calls:
        after = ours(**inputs)
    assert calls.attention_fwd == 0
    torch.testing.assert_close(after.pooler_output, want.pooler_output, rtol=0, atol=0)


def test_patched_model_pickles_and_loads_back_patched(tmp_path):
    """torch.save(model) of a patched model loads back (a bound method would pickle as a missing attribute),
    still patched and with the same answer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True))
    patch_multihead_attention(model)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(2, 5, 8)
    with count_fused_calls() as calls:
        out = loaded[1](x, x, x, need_weights=False)[0]
    assert calls.attention_fwd == 1
    torch.testing.assert_close(out, model[1](x, x, x, need_weights=False)[0])


def test_unpatch_timm_leaves_multihead_attention_alone():
    """timm's unpatch and this patch keep their own attributes: unpatching timm modules does not touch a patched
    nn.MultiheadAttention (it used to raise and half-unpatch it)."""
    from perceiver_fast.integrations import unpatch_timm_vit

    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    patch_multihead_attention(model)
    unpatch_timm_vit(model)
    x = torch.randn(2, 5, 8)
    with count_fused_calls() as calls:
        model[0](x, x, x, need_weights=False)
    assert calls.attention_fwd == 1
    unpatch_multihead_attention(model)
    assert "forward" not in vars(model[0])
