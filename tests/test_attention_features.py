"""Grouped-query heads, bottom-right causal masking and logit soft-capping of the attention ops.

Same style as test_attention.py: every case runs both backends ("triton" under the
Triton interpreter on a CPU-only machine, and "torch"), against attention_reference
in float64, forward and every gradient (dq, dk, dv), with the ops' buffers NaN-poisoned
so that an element a kernel fails to write shows up. Shapes are tiny (the interpreter's
blocks are 16 wide), fp32 (the interpreter's bf16 tl.dot is wrong, triton-lang/triton#11584).
"""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from helpers import HAS_CUDA
from perceiver_fast.ops import attention as A
from perceiver_fast.ops import attention_cpu as AC
from perceiver_fast.ops import attention_triton as AT
from perceiver_fast.ops.backend import poison_outputs
from perceiver_fast.ops.reference import attention_keep_mask, attention_reference

BACKENDS = ["triton", "torch"]


@pytest.fixture(autouse=True)
def _poison():
    with poison_outputs():
        yield


def _dev() -> str:
    return "cuda" if HAS_CUDA else "cpu"


def _inputs(Bq, B, N, M, H, Hkv, Dqk, Dv, dtype=torch.float32):
    q = torch.randn(Bq, N, H, Dqk, device=_dev(), dtype=dtype)
    k = torch.randn(B, M, Hkv, Dqk, device=_dev(), dtype=dtype)
    v = torch.randn(B, M, Hkv, Dv, device=_dev(), dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _mask(B, M):
    """Random key padding with key 0 kept, batch element 0 fully padded."""
    mask = torch.rand(B, M, device=_dev()) > 0.3
    mask[:, 0] = True
    mask[0] = False
    return mask


def _run(fn, tensors, grad, **kw):
    """(out, dq, dk, dv, lse or None) of fn(*tensors, **kw) for the upstream ``grad``."""
    for t in tensors:
        t.grad = None
    res = fn(*tensors, **kw)
    out, lse = res if isinstance(res, tuple) else (res, None)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in tensors] + [lse]


def _reference(tensors, grad, dtype=torch.float64, **kw):
    copies = [t.detach().to(dtype).requires_grad_() for t in tensors]
    return _run(attention_reference, copies, grad.to(dtype), **kw)[:4]


def _reference_lse(q, k, mask, causal, softcap, scale):
    """float64 logsumexp of the scaled, capped, masked scores, (B, H, N); +inf for a row with no key."""
    B, H = k.shape[0], q.shape[2]
    kk = k.detach().double().repeat_interleave(H // k.shape[2], dim=2)
    s = torch.einsum("bnhd,bmhd->bhnm", q.detach().double().expand(B, -1, -1, -1), kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    keep = attention_keep_mask(mask, causal, q.shape[1], k.shape[1], q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = s.logsumexp(-1)
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def _assert_all_close(ours, ref, atol=2e-5, rtol=1e-5, names=("out", "dq", "dk", "dv")):
    for name, a, b in zip(names, ours, ref):
        assert not torch.isnan(a).any(), f"{name} has NaN (unwritten or invalid element)"
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# (Bq, B, N, M, H, Hkv, Dqk, Dv, causal, softcap, masked, softmax_scale)
CASES = {
    "N1-gqa2": (2, 2, 1, 23, 4, 2, 16, 16, False, 0.0, False, None),
    "N1-causal-mqa": (2, 2, 1, 23, 2, 1, 8, 8, True, 0.0, False, None),
    "mqa8-causal-N>M": (2, 2, 23, 17, 8, 1, 8, 12, True, 0.0, False, None),
    "gqa2-causal-N<M-mask": (2, 2, 17, 37, 4, 2, 8, 8, True, 0.0, True, None),
    "causal-N==M-D72": (2, 2, 20, 20, 2, 2, 72, 72, True, 0.0, False, None),
    "softcap": (2, 2, 17, 23, 2, 2, 16, 16, False, 1.5, False, None),
    "softcap-saturated": (2, 2, 9, 21, 2, 1, 16, 16, False, 2.0, False, 3.0),
    "softcap-causal-gqa2-mask-shared_q": (1, 2, 19, 33, 4, 2, 24, 40, True, 2.0, True, None),
    "D1-causal-softcap-N>M": (2, 2, 30, 18, 2, 1, 1, 1, True, 0.5, False, None),
    "D261-mqa-causal": (1, 2, 5, 7, 2, 1, 261, 261, True, 0.0, False, None),
    "D512-causal-softcap": (1, 1, 3, 5, 2, 1, 512, 512, True, 1.0, False, None),
    "Dqk!=Dv-gqa2-causal-mask": (2, 2, 9, 18, 4, 2, 40, 130, True, 0.0, True, None),
    "shared_q-mqa8-mask": (1, 3, 20, 37, 8, 1, 16, 5, False, 0.0, True, None),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_cross_features_match_float64(backend, name):
    """Output, lse and every gradient against float64, for GQA / causal / softcap and their combinations."""
    Bq, B, N, M, H, Hkv, Dqk, Dv, causal, softcap, masked, scale = CASES[name]
    q, k, v = _inputs(Bq, B, N, M, H, Hkv, Dqk, Dv)
    mask = _mask(B, M) if masked else None
    grad = torch.randn(B, N, H, Dv, device=q.device)
    kw = dict(key_padding_mask=mask, causal=causal, softcap=softcap, softmax_scale=scale)
    ours = _run(A.cross_attention, [q, k, v], grad, backend=backend, return_lse=True, **kw)
    ref = _reference([q, k, v], grad, **kw)
    _assert_all_close(ours, ref)
    lse = ours[4]
    assert lse.dtype == torch.float32 and lse.shape == (B, H, N)
    ref_lse = _reference_lse(q, k, mask, causal, softcap, Dqk ** -0.5 if scale is None else scale)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    empty = torch.isinf(ref_lse)  # rows with no visible key: zeros out, zero dq, lse +inf
    if causal and N > M:
        assert empty[:, :, : N - M].all()
    if empty.any():
        assert (ours[0].transpose(1, 2)[empty] == 0).all()
        if Bq == B:
            assert (ours[1].transpose(1, 2)[empty] == 0).all()
    if masked:  # batch 0 fully padded: zero dK, dV
        assert (ours[2][0] == 0).all() and (ours[3][0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,softcap,Hkv", [(True, 0.0, 1), (True, 1.5, 2), (False, 1.0, 4)])
def test_self_attention_features_match_float64(backend, causal, softcap, Hkv):
    B, N, H, D = 2, 21, 4, 12
    q = torch.randn(B, N, H, D, device=_dev(), requires_grad=True)
    k = torch.randn(B, N, Hkv, D, device=_dev(), requires_grad=True)
    v = torch.randn(B, N, Hkv, D, device=_dev(), requires_grad=True)
    grad = torch.randn(B, N, H, D, device=_dev())
    ours = _run(A.self_attention, [q, k, v], grad, backend=backend, causal=causal, softcap=softcap,
                return_lse=True)
    ref = _reference([q, k, v], grad, causal=causal, softcap=softcap)
    _assert_all_close(ours, ref)
    torch.testing.assert_close(ours[4].double(), _reference_lse(q, k, None, causal, softcap, D ** -0.5),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_features_within_eager_error(backend):
    """fp16 (CPU-safe under the interpreter) GQA + causal + softcap: error at most 2x eager fp16's, plus a floor."""
    q, k, v = _inputs(1, 2, 19, 33, 4, 2, 24, 40, dtype=torch.float16)
    mask = _mask(2, 33)
    mask[0, :5] = True
    grad = torch.randn(2, 19, 4, 40, device=q.device, dtype=torch.float16)
    kw = dict(key_padding_mask=mask, causal=True, softcap=2.0)
    ours = _run(A.cross_attention, [q, k, v], grad, backend=backend, **kw)[:4]
    assert all(t.dtype == torch.float16 for t in ours)
    eager = _run(attention_reference, [q, k, v], grad, **kw)[:4]
    ref = _reference([q, k, v], grad, **kw)
    for name, a, e, r in zip(("out", "dq", "dk", "dv"), ours, eager, ref):
        assert not torch.isnan(a).any(), f"{name} has NaN"
        err, eager_err = (a.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        assert err <= 2 * eager_err + 2e-3, f"{name}: error {err:.3e} > 2 x eager {eager_err:.3e} + 2e-3"


def test_split_kv_with_causal_skips_splits_above_the_diagonal(monkeypatch):
    """Split-KV (2 and 3 splits of 16 keys) under causal masking and GQA equals the unsplit answer and float64.

    With N == M == 40 and 3 splits, the first query tile (rows 0-15) sees only split 0: splits 1 and 2 lie
    wholly above its diagonal and contribute empty partials (lse -inf) to the merge and zeros to dQ.
    """
    monkeypatch.setattr(AT, "SPLIT_GRANULE", 16)
    assert AT.split_keys(40, 3) == (16, 3)
    B, N, M, H, Hkv, D = 2, 40, 40, 4, 2, 8
    q, k, v = _inputs(B, B, N, M, H, Hkv, D, D)
    mask = torch.rand(B, M, device=q.device) > 0.2
    mask[:, 0] = True
    grad = torch.randn(B, N, H, D, device=q.device)
    results = {}
    for splits in (1, 2, 3):
        results[splits] = _run(A.cross_attention, [q, k, v], grad, key_padding_mask=mask, causal=True, softcap=3.0,
                               num_splits=splits, backend="triton", return_lse=True)
    for splits in (2, 3):
        _assert_all_close(results[splits], results[1], atol=1e-6, rtol=1e-6, names=("out", "dq", "dk", "dv", "lse"))
    _assert_all_close(results[3], _reference([q, k, v], grad, key_padding_mask=mask, causal=True, softcap=3.0))
    # N > M: the first tile's rows 0-9 see no key at all, the other rows only split 0 or 1
    q2, k2, v2 = _inputs(1, B, 50, 40, H, Hkv, D, D)
    grad2 = torch.randn(B, 50, H, D, device=q.device)
    ours = _run(A.cross_attention, [q2, k2, v2], grad2, causal=True, num_splits=3, backend="triton")
    _assert_all_close(ours, _reference([q2, k2, v2], grad2, causal=True))


def test_kernel_column_tiles_with_gqa_causal_softcap(monkeypatch):
    """Both backward kernels with column tiles narrower than the head dims (a dK tile past Dqk skipped)."""
    cfg = triton.Config(dict(BLOCK_N=16, BLOCK_M=16, BLOCK_D=32, BLOCK_DT=32), num_warps=4)
    for kernel in (AT.attn_bwd_dkdv_kernel, AT.attn_bwd_dq_kernel):
        monkeypatch.setattr(kernel, "configs", [cfg])
        monkeypatch.setattr(kernel, "cache", {})
    q, k, v = _inputs(1, 2, 21, 35, 6, 2, 40, 70)
    mask = _mask(2, 35)
    grad = torch.randn(2, 21, 6, 70, device=q.device)
    kw = dict(key_padding_mask=mask, causal=True, softcap=1.0)
    ours = _run(A.cross_attention, [q, k, v], grad, backend="triton", num_splits=2, **kw)
    _assert_all_close(ours, _reference([q, k, v], grad, **kw))


# ---------------------------------------------------------------------------
# Dropout with grouped heads: the forward's mask is the backward's
# ---------------------------------------------------------------------------
@triton.jit
def _keep_mask_kernel(Out, seed, H, N, M, dropout_p, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    # The (B, H, N, M) keep-mask the attention kernels draw (query-head offsets).
    # Grid: (cdiv(N, BLOCK_N), B * H, cdiv(M, BLOCK_M)).
    pid_bh = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    keep = AT.dropout_keep(seed, pid_bh, offs_n, offs_m, N, M, dropout_p)
    ptrs = Out + (pid_bh * N + offs_n.to(tl.int64)[:, None]) * M + offs_m[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))


def _keep_mask(backend, seed, B, H, N, M, p, device):
    if backend == "triton":
        out = torch.empty((B, H, N, M), device=device, dtype=torch.int8)
        _keep_mask_kernel[(triton.cdiv(N, 16), B * H, triton.cdiv(M, 16))](out, seed, H, N, M, p,
                                                                           BLOCK_N=16, BLOCK_M=16)
        return out.bool()
    return AC.dropout_keep_chunk(seed, 0, (B, H, N, M), p, device)


def _dropout_reference(mask, keep, p, causal, softcap):
    """float64 attention with an explicit (B, H, N, M) dropout keep-mask, GQA by repeating K/V."""
    def f(q, k, v):
        B, H = k.shape[0], q.shape[2]
        g = H // k.shape[2]
        k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
        s = torch.einsum("bnhd,bmhd->bhnm", q.expand(B, -1, -1, -1), k) * q.shape[-1] ** -0.5
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        allowed = attention_keep_mask(mask, causal, q.shape[1], k.shape[1], q.device)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        probs = s.softmax(-1).nan_to_num(0.0) * keep / (1 - p)
        return torch.einsum("bhnm,bmhd->bnhd", probs, v)
    return f


@pytest.mark.parametrize("backend,splits", [("triton", 1), ("triton", 2), ("torch", 0)])
def test_dropout_with_gqa_uses_query_head_offsets(backend, splits):
    """Forward and backward draw the same keep-mask, indexed by query head: rebuild it and compare in float64."""
    B, N, M, H, Hkv, D, p = 2, 17, 23, 4, 2, 8, 0.3
    q, k, v = _inputs(1, B, N, M, H, Hkv, D, D)
    mask = _mask(B, M)
    mask[0, :3] = True
    grad = torch.randn(B, N, H, D, device=q.device)
    torch.manual_seed(5)
    ours = _run(A.cross_attention, [q, k, v], grad, key_padding_mask=mask, dropout_p=p, causal=True, softcap=2.0,
                backend=backend, num_splits=splits)[:4]
    torch.manual_seed(5)
    keep = _keep_mask(backend, int(A.draw_dropout_seed(p).item()), B, H, N, M, p, q.device)
    copies = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _run(_dropout_reference(mask, keep, p, True, 2.0), copies, grad.double())[:4]
    _assert_all_close(ours, ref)


# ---------------------------------------------------------------------------
# Dropout over sharded keys: key_offset / total_keys reproduce the unsharded mask
# ---------------------------------------------------------------------------
# backend: (M, shard sizes, num_splits). The "torch" shards cross the chunked loop's 1024-key chunks
# (global chunks 0, 1 and 2 of 2100 keys, a shard boundary inside chunk 0); the "triton" ones the
# interpreter's 16-key blocks and split-KV, with an empty shard.
SHARDED = {"triton": (40, [7, 0, 20, 13], 2), "torch": (2100, [1000, 0, 1100], 0)}


def _merge_shards(parts):
    """(out, lse) of the whole key set from every shard's (out, lse): the split-KV / sharded merge."""
    lses = torch.stack([torch.where(lse.isposinf(), -math.inf, lse) for _, lse in parts])  # (S, B, H, N)
    lse = torch.logsumexp(lses, 0)
    safe = torch.where(lse.isneginf(), 0.0, lse)
    w = torch.exp(lses - safe).permute(0, 1, 3, 2)[..., None]  # (S, B, N, H, 1)
    out = sum(wi * o.float() for wi, (o, _) in zip(w, parts))
    return out.contiguous(), torch.where(lse.isneginf(), math.inf, lse).contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_keys_reproduce_the_unsharded_dropout(backend):
    """Shards called with their key_offset / total_keys merge to the unsharded op, forward and backward."""
    M, sizes, splits = SHARDED[backend]
    B, N, H, Hkv, D, p, scale = 2, 5, 4, 2, 8, 0.3, 0.35
    q, k, v = (t.detach() for t in _inputs(1, B, N, M, H, Hkv, D, D))
    mask = _mask(B, M)
    seed = torch.tensor([20240607])
    fwd, bwd = torch.ops.perceiver_fast.attention_fwd, torch.ops.perceiver_fast.attention_bwd
    out, lse = fwd(q, k, v, mask, seed, p, scale, splits, backend)
    grad = torch.randn_like(out)
    dq, dk, dv = bwd(grad, q, k, v, out, lse, mask, seed, p, scale, splits, backend)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    pieces = [(k[:, a:a + n], v[:, a:a + n], mask[:, a:a + n], a) for a, n in zip(starts, sizes)]
    parts = [fwd(q, ks, vs, ms, seed, p, scale, splits, backend, False, 0.0, a, M) for ks, vs, ms, a in pieces]
    m_out, m_lse = _merge_shards(parts)
    torch.testing.assert_close(m_out, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m_lse, lse, atol=1e-5, rtol=1e-5)
    grads = [bwd(grad, q, ks, vs, out, lse, ms, seed, p, scale, splits, backend, False, 0.0, a, M)
             for ks, vs, ms, a in pieces]
    torch.testing.assert_close(sum(g[0] for g in grads), dq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([g[1] for g in grads], 1), dk, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([g[2] for g in grads], 1), dv, atol=1e-5, rtol=1e-5)
    # Without the global range every shard draws its own local mask: a different result.
    local = [fwd(q, ks, vs, ms, seed, p, scale, splits, backend) for ks, vs, ms, _ in pieces]
    assert not torch.allclose(_merge_shards(local)[0], out, atol=1e-3)


def _keep_from_eye(fn, q, k, mask, B, Hkv, M):
    """(B, N, H, M) keep-mask of a forward ``fn(q, k, v, mask)`` read through one-hot values."""
    eye = torch.eye(M, device=q.device)[None, :, None, :].expand(B, -1, Hkv, -1).contiguous()
    return fn(q, k, eye, mask)[0] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_keys_draw_the_unsharded_keep_mask_bit_for_bit(backend):
    """The keep decision of (b, h, n, global key j) is the unsharded one, read out exactly with one-hot values.

    "torch": the chunked loop with 16-key chunks (the grid is the loop's chunk), shards off the grid.
    """
    M, sizes = 40, [7, 0, 20, 13]
    B, N, H, Hkv, D, p = 2, 5, 4, 2, 8, 0.3
    q, k, _ = (t.detach() for t in _inputs(1, B, N, M, H, Hkv, D, D))
    seed = torch.tensor([77])

    def run(key_offset, total_keys):
        if backend == "torch":
            return lambda q, k, v, m: AC.attention_fwd_chunked(q, k, v, m, 77, p, 0.3, chunk=16,
                                                               key_offset=key_offset, total_keys=total_keys)
        return lambda q, k, v, m: torch.ops.perceiver_fast.attention_fwd(q, k, v, m, seed, p, 0.3, 2, backend,
                                                                         False, 0.0, key_offset, total_keys)

    keep = _keep_from_eye(run(0, 0), q, k, None, B, Hkv, M)
    assert 0.6 < keep.float().mean() < 0.8
    parts, a = [], 0
    for n in sizes:
        parts.append(_keep_from_eye(run(a, M), q, k[:, a:a + n], None, B, Hkv, n))
        a += n
    assert torch.equal(torch.cat(parts, -1), keep)


def test_key_chunks_follow_the_global_grid():
    assert AC.key_chunks(2500, 1024) == [(0, 1024), (1024, 2048), (2048, 2500)]
    assert AC.key_chunks(2500, 1024, 1000) == [(0, 24), (24, 1048), (1048, 2072), (2072, 2500)]
    assert AC.key_chunks(0, 1024, 5) == []


@pytest.mark.parametrize("kw,exc,text", [
    (dict(key_offset=-1, total_keys=20), ValueError, "key_offset must be >= 0"),
    (dict(key_offset=0, total_keys=-2), ValueError, "total_keys must be >= 0"),
    (dict(key_offset=3, total_keys=0), ValueError, "key_offset=3 needs total_keys > 0"),
    (dict(key_offset=14, total_keys=20), ValueError, "exceeds total_keys=20"),
    (dict(key_offset=0, total_keys=5), ValueError, "exceeds total_keys=5"),
])
@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_bad_key_range_raises_naming_the_argument(kw, exc, text, which):
    q, k, v = (t.detach() for t in _inputs(1, 2, 3, 7, 2, 2, 4, 4))
    seed = torch.tensor([1])
    args = (q, k, v, None, seed, 0.2, 0.5, 0, "torch", False, 0.0, kw["key_offset"], kw["total_keys"])
    with pytest.raises(exc, match=text):
        if which == "fwd":
            torch.ops.perceiver_fast.attention_fwd(*args)
        else:
            out = torch.zeros(2, 3, 2, 4)
            lse = torch.zeros(2, 2, 3)
            torch.ops.perceiver_fast.attention_bwd(out, q, k, v, out, lse, *args[3:])


def test_key_range_types_are_checked():
    with pytest.raises(TypeError, match="key_offset must be an int"):
        A.check_key_range("op", True, 10, 3)
    with pytest.raises(TypeError, match="total_keys must be an int"):
        A.check_key_range("op", 0, 10.0, 3)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
def _bad_cases():
    q = torch.randn(2, 3, 3, 4)
    k = torch.randn(2, 5, 2, 4)
    qq = torch.randn(2, 5, 4, 4)
    return [
        ("heads_not_multiple", A.cross_attention, (q, k, k), {}, ValueError, "key/value heads"),
        ("self_heads_not_multiple", A.self_attention, (torch.randn(2, 5, 3, 4), k, k), {}, ValueError,
         "Hkv dividing H"),
        ("softcap_negative", A.cross_attention, (qq, k, k), {"softcap": -1.0}, ValueError, "softcap"),
        ("softcap_nan", A.cross_attention, (qq, k, k), {"softcap": math.nan}, ValueError, "softcap"),
        ("softcap_inf", A.self_attention, (qq, qq, qq), {"softcap": math.inf}, ValueError, "softcap"),
        ("softcap_bool", A.self_attention, (qq, qq, qq), {"softcap": True}, ValueError, "softcap"),
        ("causal_int", A.cross_attention, (qq, k, k), {"causal": 1}, TypeError, "causal"),
        ("causal_str", A.self_attention, (qq, qq, qq), {"causal": "yes"}, TypeError, "causal"),
        ("return_lse_int", A.cross_attention, (qq, k, k), {"return_lse": 1}, TypeError, "return_lse"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_feature_arguments_raise_naming_the_argument(case):
    _, fn, args, kw, exc, text = case
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    assert text in str(info.value), str(info.value)


# ---------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_causal_softcap_gqa(backend):
    q, k, v = [t.detach() for t in _inputs(1, 2, 9, 7, 4, 2, 6, 3)]
    mask = _mask(2, 7)
    seed = torch.tensor([7])
    fwd = torch.ops.perceiver_fast.attention_fwd
    torch.library.opcheck(fwd.default, (q, k, v, mask, seed, 0.2, 0.4, 2, backend, True, 1.5))
    torch.library.opcheck(fwd.default, (q, k, v, None, None, 0.0, 0.4, 0, backend, True, 0.0))
    out, lse = fwd(q, k, v, mask, seed, 0.2, 0.4, 1, backend, True, 1.5)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.perceiver_fast.attention_bwd.default,
                          (grad, q, k, v, out, lse, mask, seed, 0.2, 0.4, 2, backend, True, 1.5))
    # a shard of keys: the global range of its dropout draws
    torch.library.opcheck(fwd.default, (q, k, v, mask, seed, 0.2, 0.4, 2, backend, False, 0.0, 5, 19))
    out, lse = fwd(q, k, v, mask, seed, 0.2, 0.4, 2, backend, False, 0.0, 5, 19)
    torch.library.opcheck(torch.ops.perceiver_fast.attention_bwd.default,
                          (grad, q, k, v, out, lse, mask, seed, 0.2, 0.4, 2, backend, False, 0.0, 5, 19))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_with_features(backend):
    q, k, v = _inputs(1, 2, 6, 9, 4, 2, 8, 8)
    mask = _mask(2, 9)
    mask[0, :2] = True

    def f(q, k, v):
        x = A.cross_attention(q, k, v, key_padding_mask=mask, causal=True, softcap=2.0, backend=backend)
        y, lse = A.self_attention(x, x[:, :, :2], x[:, :, :2], causal=True, softcap=1.0, return_lse=True,
                                  backend=backend)
        return y.square().sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    eager_loss = f(q, k, v)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for a, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(a, t.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,softcap,Hkv", [(False, 0.0, 2), (True, 2.0, 2), (False, 0.0, 1)])
def test_backward_op_takes_out_and_grad_with_any_strides(backend, causal, softcap, Hkv):
    """The backward custom op called directly with an ``out`` / ``grad_out`` whose head dim is not contiguous
    (a permuted copy) gives the same gradients as with contiguous ones (the kernels read unit-stride rows)."""
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 9, 2, 16), torch.randn(2, 13, Hkv, 16), torch.randn(2, 13, Hkv, 16)
    scale = 16 ** -0.5
    out, lse = torch.ops.perceiver_fast.attention_fwd(q, k, v, None, None, 0.0, scale, 1, backend, causal, softcap)
    do = torch.randn_like(out)

    def head_dim_strided(t):
        return t.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)

    want = torch.ops.perceiver_fast.attention_bwd(do, q, k, v, out, lse, None, None, 0.0, scale, 1, backend,
                                                  causal, softcap)
    got = torch.ops.perceiver_fast.attention_bwd(head_dim_strided(do), q, k, v, head_dim_strided(out),
                                                 lse.transpose(1, 2).contiguous().transpose(1, 2), None, None, 0.0,
                                                 scale, 1, backend, causal, softcap)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_returned_lse_is_not_differentiable():
    """The lse carries no gradient: a backward through it raises instead of silently giving zeros."""
    q = torch.randn(1, 3, 2, 8, requires_grad=True)
    out, lse = A.cross_attention(q, torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8), return_lse=True,
                                 backend="torch")
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        lse.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_check_heads_softcap_and_scale_themselves(backend):
    """Direct op callers get the same clear errors as the public functions (a bad group would read past K/V)."""
    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 5, 3, 8)
    op = torch.ops.perceiver_fast.attention_fwd
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        op(q, k, k, None, None, 0.0, 0.5, 1, backend)
    k = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="softcap must be"):
        op(q, k, k, None, None, 0.0, 0.5, 1, backend, False, -1.0)
    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        op(q, k, k, None, None, 0.0, float("nan"), 1, backend)
