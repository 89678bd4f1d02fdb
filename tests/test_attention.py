"""Tests of perceiver_fast.ops.attention (cross_attention, self_attention).

On a machine without a GPU the Triton kernels run under the Triton interpreter
(conftest sets TRITON_INTERPRET=1), so shapes are kept tiny. Every case runs
both backends: "triton" (the real kernels) and "torch" (the chunked PyTorch
fallback used for CPU tensors outside the interpreter). Every buffer the ops
allocate starts as NaN (``poison_outputs``), so an element a kernel fails to
write shows up as a mismatch. The backend and split count are op arguments;
``KNOBS`` holds the ones a test sets, and ``cross``/``self_attn`` pass them.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from helpers import HAS_CUDA, requires_cuda
from perceiver_fast.ops import attention as A
from perceiver_fast.ops import attention_cpu as AC
from perceiver_fast.ops import attention_triton as AT
from perceiver_fast.ops.backend import poison_outputs
from perceiver_fast.ops.reference import attention_reference

BACKENDS = ["triton", "torch"]


KNOBS = {"backend": "auto", "num_splits": 0}


@pytest.fixture(autouse=True)
def _attention_knobs():
    saved = dict(KNOBS)
    with poison_outputs():
        yield
    KNOBS.update(saved)


def cross(q, k, v, **kw):
    """cross_attention with the backend and split count the test chose."""
    return A.cross_attention(q, k, v, **{**KNOBS, **kw})


def self_attn(q, k, v, **kw):
    return A.self_attention(q, k, v, backend=KNOBS["backend"], **kw)


def _dev() -> str:
    return "cuda" if HAS_CUDA else "cpu"


def _inputs(Bq, B, N, M, H, Dqk, Dv, dtype=torch.float32, device=None):
    device = device or _dev()
    q = torch.randn(Bq, N, H, Dqk, device=device, dtype=dtype)
    k = torch.randn(B, M, H, Dqk, device=device, dtype=dtype)
    v = torch.randn(B, M, H, Dv, device=device, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _run(fn, tensors, grad, **kw):
    """Output and input grads of fn(*tensors, **kw) for the upstream ``grad``."""
    for t in tensors:
        t.grad = None
    out = fn(*tensors, **kw)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in tensors]


def _reference(tensors, grad, dtype=torch.float64, **kw):
    copies = [t.detach().to(dtype).requires_grad_() for t in tensors]
    return _run(attention_reference, copies, grad.to(dtype), **kw)


def _assert_all_close(ours, ref, atol, rtol, names=("out", "dq", "dk", "dv")):
    for name, a, b in zip(names, ours, ref):
        assert not torch.isnan(a).any(), f"{name} has NaN (unwritten or invalid element)"
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _assert_within_eager(ours, eager, ref, floor):
    """Error vs float64 at most 2x that of same-dtype eager PyTorch, plus a floor."""
    for name, a, e, r in zip(("out", "dq", "dk", "dv"), ours, eager, ref):
        assert not torch.isnan(a).any(), f"{name} has NaN"
        err = (a.double() - r).abs().max().item()
        eager_err = (e.double() - r).abs().max().item()
        assert err <= 2 * eager_err + floor, f"{name}: error {err:.3e} > 2 x eager {eager_err:.3e} + {floor}"


def _mask(B, M, fully_masked_batch=True, device=None):
    mask = torch.rand(B, M, device=device or _dev()) > 0.3
    mask[:, 0] = True
    if fully_masked_batch:
        mask[0] = False
    return mask


# (Bq, B, N, M, H, Dqk, Dv, masked)
CROSS_CASES = [
    (2, 2, 1, 1, 1, 1, 1, False),
    (2, 2, 17, 23, 1, 3, 3, False),
    (1, 3, 20, 37, 2, 16, 5, True),
    (1, 3, 20, 37, 2, 16, 16, True),
    (2, 2, 33, 9, 8, 64, 64, False),
    (2, 2, 9, 18, 2, 40, 130, True),
    (1, 2, 5, 7, 1, 261, 261, False),
    (2, 2, 4, 6, 1, 322, 322, True),
    (1, 1, 3, 5, 1, 512, 512, False),
    (1, 2, 2, 3, 1, 1024, 1024, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CROSS_CASES, ids=lambda c: "Bq{}B{}N{}M{}H{}Dqk{}Dv{}{}".format(*c[:7], "mask" if c[7] else ""))
def test_cross_fp32_matches_float64(backend, case):
    KNOBS["backend"] = backend
    Bq, B, N, M, H, Dqk, Dv, masked = case
    q, k, v = _inputs(Bq, B, N, M, H, Dqk, Dv)
    mask = _mask(B, M) if masked else None
    grad = torch.randn(B, N, H, Dv, device=q.device)
    ours = _run(cross, [q, k, v], grad, key_padding_mask=mask)
    ref = _reference([q, k, v], grad, key_padding_mask=mask)
    _assert_all_close(ours, ref, atol=2e-5, rtol=1e-5)
    if masked:  # batch 0 has every key masked: zeros, zero gradients
        assert (ours[0][0] == 0).all() and (ours[2][0] == 0).all() and (ours[3][0] == 0).all()


# (dtype, (Bq, B, N, M, H, Dqk, Dv, masked), error floor)
LOW_PRECISION_CASES = {
    "fp16-shared_mask": (torch.float16, (1, 2, 19, 33, 2, 24, 40, True), 2e-3),
    "fp16-D261": (torch.float16, (2, 2, 5, 7, 1, 261, 261, False), 2e-3),
    "fp16-D322-resident-tails": (torch.float16, (1, 2, 19, 21, 1, 322, 322, True), 2e-3),
    "fp16-D512-Dv40": (torch.float16, (1, 2, 9, 37, 1, 512, 40, True), 2e-3),
    "bf16-shared_mask": (torch.bfloat16, (1, 2, 19, 33, 2, 24, 40, True), 1e-2),
    # Dqk == Dv: the "torch" backend runs these through the fused CPU kernel.
    "fp16-shared_mask-same_dims": (torch.float16, (1, 2, 19, 33, 2, 24, 24, True), 2e-3),
    "bf16-shared_mask-same_dims": (torch.bfloat16, (1, 2, 19, 33, 2, 24, 24, True), 1e-2),
    "bf16-D261": (torch.bfloat16, (2, 2, 5, 7, 1, 261, 261, False), 1e-2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(LOW_PRECISION_CASES))
def test_cross_low_precision_within_eager_error(backend, name):
    dtype, case, floor = LOW_PRECISION_CASES[name]
    if dtype == torch.bfloat16 and backend == "triton" and not HAS_CUDA:
        pytest.skip("bf16 tl.dot is wrong under the Triton interpreter (triton-lang/triton#11584); runs on GPU")
    KNOBS["backend"] = backend
    Bq, B, N, M, H, Dqk, Dv, masked = case
    q, k, v = _inputs(Bq, B, N, M, H, Dqk, Dv, dtype=dtype)
    mask = _mask(B, M, fully_masked_batch=False) if masked else None
    grad = torch.randn(B, N, H, Dv, device=q.device, dtype=dtype)
    ours = _run(cross, [q, k, v], grad, key_padding_mask=mask)
    assert all(t.dtype == dtype for t in ours)
    eager = _run(attention_reference, [q, k, v], grad, key_padding_mask=mask)
    ref = _reference([q, k, v], grad, key_padding_mask=mask)
    _assert_within_eager(ours, eager, ref, floor=floor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [3, 64])
def test_self_attention_packed_qkv_views(backend, dtype, D, monkeypatch):
    """q, k, v are views of one (B, N, 3, H, D) projection and reach the op uncopied."""
    KNOBS["backend"] = backend
    B, N, H = 2, 21, 2
    qkv = torch.randn(B, N, 3, H, D, device=_dev(), dtype=dtype, requires_grad=True)
    seen = []
    real_fwd = A.attention_fwd_cpu
    monkeypatch.setattr(A, "attention_fwd_cpu", lambda q, *a, **kw: seen.append(q) or real_fwd(q, *a, **kw))
    if backend == "triton":
        real_tri = AT.attention_fwd_triton
        monkeypatch.setattr(AT, "attention_fwd_triton", lambda q, *a, **kw: seen.append(q) or real_tri(q, *a, **kw))
    grad = torch.randn(B, N, H, D, device=_dev(), dtype=dtype)
    out = self_attn(*qkv.unbind(2))
    out.backward(grad)
    assert seen and seen[0].data_ptr() == qkv.data_ptr() and seen[0].stride() == qkv[:, :, 0].stride()
    ref_qkv = qkv.detach().double().requires_grad_()
    ref = attention_reference(*ref_qkv.unbind(2))
    ref.backward(grad.double())
    if dtype == torch.float32:
        _assert_all_close([out, qkv.grad], [ref, ref_qkv.grad], atol=2e-5, rtol=1e-5, names=("out", "dqkv"))
    else:
        e_qkv = qkv.detach().clone().requires_grad_()
        eager = attention_reference(*e_qkv.unbind(2))
        eager.backward(grad)
        for name, a, e, r in (("out", out, eager, ref), ("dqkv", qkv.grad, e_qkv.grad, ref_qkv.grad)):
            err, eager_err = (a.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
            assert err <= 2 * eager_err + 2e-3, f"{name}: {err:.3e} vs eager {eager_err:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_packed_kv_views(backend):
    KNOBS["backend"] = backend
    B, N, M, H, D = 2, 9, 26, 2, 12
    latents = torch.randn(1, N, H, D, device=_dev(), requires_grad=True)
    kv = torch.randn(B, M, 2, H, D, device=_dev(), requires_grad=True)
    grad = torch.randn(B, N, H, D, device=_dev())
    out = cross(latents, *kv.unbind(2))
    out.backward(grad)
    rl, rkv = latents.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
    ref = attention_reference(rl, *rkv.unbind(2))
    ref.backward(grad.double())
    _assert_all_close([out, latents.grad, kv.grad], [ref, rl.grad, rkv.grad], atol=2e-5, rtol=1e-5,
                      names=("out", "dlatents", "dkv"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_attention_wide_head_dim(backend):
    """The head-dim policy lives in the op: self_attention takes D > 256 (here 300) itself."""
    KNOBS["backend"] = backend
    q, k, v = _inputs(2, 2, 6, 6, 1, 300, 300)
    grad = torch.randn(2, 6, 1, 300, device=q.device)
    ours = _run(self_attn, [q, k, v], grad)
    ref = _reference([q, k, v], grad)
    _assert_all_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_softmax_scale_and_self_attention_head_dim_256():
    KNOBS["backend"] = "triton"
    q, k, v = _inputs(1, 1, 5, 5, 1, 256, 256)
    grad = torch.randn(1, 5, 1, 256, device=q.device)
    ours = _run(self_attn, [q, k, v], grad, softmax_scale=0.3)
    ref = _reference([q, k, v], grad, softmax_scale=0.3)
    _assert_all_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_split_kv_on_off_agree():
    """Split-KV (including more splits than key blocks) gives the unsplit answer."""
    KNOBS["backend"] = "triton"
    q, k, v = _inputs(1, 2, 18, 40, 2, 20, 36)
    mask = _mask(2, 40)
    mask[1, 17:] = False  # whole splits of batch 1 fully masked
    grad = torch.randn(2, 18, 2, 36, device=q.device)
    results = {}
    for splits in (1, 2, 3, 64):
        KNOBS["num_splits"] = splits or 0
        results[splits] = _run(cross, [q, k, v], grad, key_padding_mask=mask)
    for splits in (2, 3, 64):
        _assert_all_close(results[splits], results[1], atol=1e-6, rtol=1e-6)
    ref = _reference([q, k, v], grad, key_padding_mask=mask)
    _assert_all_close(results[3], ref, atol=2e-5, rtol=1e-5)


def test_strided_mask():
    """A mask view with a non-unit key stride is honoured."""
    KNOBS["backend"] = "triton"
    q, k, v = _inputs(2, 2, 7, 13, 1, 8, 8)
    mask = (torch.rand(2, 26, device=q.device) > 0.4)[:, ::2]
    mask[:, 0] = True
    grad = torch.randn(2, 7, 1, 8, device=q.device)
    ours = _run(cross, [q, k, v], grad, key_padding_mask=mask)
    ref = _reference([q, k, v], grad, key_padding_mask=mask)
    _assert_all_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_num_splits_heuristic():
    """FlashAttention's heuristic: no split once the tiles fill the SMs; else the fewest efficient splits."""
    assert AT.num_splits_heuristic(tiles=132, num_sms=132, key_blocks=392) == 1
    # pio-learned on an H100: 8 query tiles x 8 images = 64 tiles, 392 key blocks of 128 -> 2 full waves
    s = AT.num_splits_heuristic(tiles=64, num_sms=132, key_blocks=392)
    assert s == 2
    assert AT.num_splits_heuristic(tiles=1, num_sms=8, key_blocks=1) == 1  # one key block: nothing to split
    assert AT.num_splits_heuristic(tiles=3, num_sms=132, key_blocks=1000) >= 20


@pytest.mark.parametrize("d,budget,plan", [
    (512, 512, (512, 0, True)), (261, 512, (256, 16, True)), (322, 512, (256, 128, True)),
    (1, 512, (16, 0, True)), (64, 512, (64, 0, True)), (1024, 512, (128, 0, False)),
    (261, 256, (128, 0, False)), (130, 256, (128, 16, True)),
])
def test_head_dim_plan(d, budget, plan):
    """Head dims are covered by a resident power-of-two chunk plus a tail, or walked in chunks."""
    got = AT.plan_dim(d, budget)
    assert (got.main, got.tail, got.resident) == plan
    assert not got.resident or got.width >= d


@pytest.mark.parametrize("dqk,dv,row_pad", [(261, 322, 0), (261, 261, 3), (261, 261, 2), (40, 130, 0), (512, 8, 0)])
def test_tma_and_pointer_paths_agree(dqk, dv, row_pad):
    """The descriptor (TMA) path, on aligned or repacked rows, equals the masked pointer path and float64.

    ``row_pad`` > 0 gives k/v an odd row stride (a view of wider rows), the layout a user may hand in.
    """
    B, N, M, H = 2, 19, 45, 1
    q = torch.randn(1, N, H, dqk)
    k = torch.randn(B, M, H, dqk + row_pad)[..., :dqk]
    v = torch.randn(B, M, H, dv + row_pad)[..., :dv]
    mask = _mask(B, M, fully_masked_batch=False, device="cpu")
    outs = {}
    do = torch.randn(B, N, H, dv)
    for repack in (False, True):
        out, lse = AT.attention_fwd_triton(q, k, v, mask, None, 0.0, dqk ** -0.5, 2, repack=repack)
        grads = AT.attention_bwd_triton(do, q, k, v, out, lse, mask, None, 0.0, dqk ** -0.5, repack=repack)
        outs[repack] = (out, *grads)
    aligned = all((d + row_pad) * 4 % 16 == 0 for d in (dqk, dv))  # fp32 rows: 16-byte strides
    assert AT.plan_alignment((k, v), repack=False)[1] is aligned
    assert AT.plan_alignment((k, v), repack=True)[1] is True
    for a, b in zip(outs[False], outs[True]):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ref = attention_reference(*(t.double() for t in (q, k, v)), key_padding_mask=mask)
    torch.testing.assert_close(outs[True][0].double(), ref, atol=2e-5, rtol=1e-5)


def test_repack_copies_a_shared_k_v_once():
    """Under projection folding k is v: the unaligned tensor is repacked once and both views share it."""
    x = torch.randn(2, 9, 1, 261)
    (k, v), use_tma = AT.plan_alignment((x, x), repack=True)
    assert use_tma and k.data_ptr() == v.data_ptr() != x.data_ptr() and torch.equal(k, x)


def test_aligned_copy_pads_rows_to_16_bytes():
    x = torch.randn(2, 5, 1, 261, dtype=torch.float16)
    y = AT.aligned_copy(x)
    assert torch.equal(x, y) and y.stride(1) == 264 and AT.plan_alignment((y,), repack=False)[1]


def test_forward_plan_splits_from_real_tiles():
    """The split count follows the tile count: more images or queries, fewer splits."""
    cpu = torch.device("cpu")
    few = AT.forward_plan(64, 50176, 512, 512, torch.bfloat16, 1, 1, 0, cpu)
    many = AT.forward_plan(512, 50176, 512, 512, torch.bfloat16, 64, 1, 0, cpu)
    assert few["num_splits"] > 1 and many["num_splits"] == 1
    assert few["keys_per_split"] % AT.SPLIT_GRANULE == 0
    assert few["keys_per_split"] * few["num_splits"] >= 50176
    forced = AT.forward_plan(64, 1000, 64, 64, torch.float16, 1, 1, 3, cpu)
    assert forced["num_splits"] == 3


def test_autotune_pruning_fits_shared_memory(monkeypatch):
    """No forward config the autotuner keeps needs more shared memory than sm_90 has, nor >128 acc registers."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    configs = AT.fwd_configs()  # the GPU list
    assert len(configs) > 1
    for d in (64, 128, 256, 261, 322, 512, 1024):
        for dtype in (torch.bfloat16, torch.float32):
            budget = AT.dim_budget(dtype)
            qk, vp = AT.plan_dim(d, budget), AT.plan_dim(d, budget)
            kw = dict(DQK0=qk.main, DQK1=qk.tail, QK_RESIDENT=qk.resident, DV0=vp.main, DV1=vp.tail)
            kept = AT.prune_fwd_configs(configs, {"Q": torch.empty(0, dtype=dtype)}, **kw)
            assert kept, (d, dtype)
            for c in kept:
                assert AT.fwd_smem_estimate(c, kw, torch.empty(0, dtype=dtype).element_size()) <= AT.SMEM_BUDGET


# (BLOCK_DT, Bq, B, N, M, H, Dqk, Dv, masked, dropout_p): column tiles narrower than the head dims
# (a tile past Dqk skipped for dK), a batch-shared q, a fully masked batch, dropout.
BWD_TILE_CASES = [
    (32, 1, 2, 5, 20, 1, 261, 70, True, 0.0),
    (64, 2, 2, 18, 7, 2, 20, 130, True, 0.0),
    (32, 1, 2, 9, 20, 1, 40, 36, True, 0.3),
]


@pytest.mark.parametrize("case", BWD_TILE_CASES,
                         ids=lambda c: "BT{}-Bq{}B{}N{}M{}H{}Dqk{}Dv{}{}-p{}".format(*c[:8], "mask" * c[8], c[9]))
def test_backward_column_tiles(case, monkeypatch):
    """Both backward kernels with column tiles narrower than the head dims, against float64.

    For dropout the reference applies the kernels' own keep-mask (in place of torch's dropout).
    """
    block_dt, Bq, B, N, M, H, Dqk, Dv, masked, p = case
    cfg = triton_config(BLOCK_N=16, BLOCK_M=16, BLOCK_D=32, BLOCK_DT=block_dt, num_warps=4)
    for kernel in (AT.attn_bwd_dkdv_kernel, AT.attn_bwd_dq_kernel):
        monkeypatch.setattr(kernel, "configs", [cfg])
        monkeypatch.setattr(kernel, "cache", {})
    KNOBS["backend"] = "triton"
    KNOBS["num_splits"] = 2
    q, k, v = _inputs(Bq, B, N, M, H, Dqk, Dv)
    mask = _mask(B, M) if masked else None
    grad = torch.randn(B, N, H, Dv, device=q.device)
    torch.manual_seed(5)
    ours = _run(cross, [q, k, v], grad, key_padding_mask=mask, dropout_p=p)
    if p > 0.0:
        torch.manual_seed(5)
        keep = _keep_mask("triton", int(A.draw_dropout_seed(p).item()), B, H, N, M, p, q.device)
        ref = _run(_masked_reference(mask, keep, p), [t.detach().double().requires_grad_() for t in (q, k, v)],
                   grad.double())
    else:
        ref = _reference([q, k, v], grad, key_padding_mask=mask)
    _assert_all_close(ours, ref, atol=2e-5, rtol=1e-5)


def triton_config(num_warps=4, **kwargs):
    import triton

    return triton.Config(kwargs, num_warps=num_warps)


def _masked_reference(mask, keep, p):
    """float64 attention with an explicit dropout keep-mask (B, H, N, M) and key padding mask."""
    def f(q, k, v):
        B = k.shape[0]
        s = torch.einsum("bnhd,bmhd->bhnm", q.expand(B, -1, -1, -1), k) * q.shape[-1] ** -0.5
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = (s.softmax(-1).nan_to_num(0.0)) * keep / (1 - p)
        return torch.einsum("bhnm,bmhd->bnhd", probs, v)
    return f


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_fallback_many_chunks(backend, monkeypatch):
    """The fallback's online softmax across several key chunks (chunk 8, M 37)."""
    KNOBS["backend"] = backend
    monkeypatch.setattr(AC, "DEFAULT_CHUNK", 8)
    q, k, v = _inputs(1, 2, 6, 37, 2, 5, 7)
    mask = _mask(2, 37)
    grad = torch.randn(2, 6, 2, 7, device=q.device)
    ours = _run(cross, [q, k, v], grad, key_padding_mask=mask)
    ref = _reference([q, k, v], grad, key_padding_mask=mask)
    _assert_all_close(ours, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequences(backend):
    KNOBS["backend"] = backend
    q, k, v = _inputs(2, 2, 0, 5, 1, 4, 6)
    out = cross(q, k, v)
    assert out.shape == (2, 0, 1, 6)
    out.sum().backward()
    assert q.grad.shape == q.shape and (k.grad == 0).all() and (v.grad == 0).all()

    q, k, v = _inputs(1, 0, 3, 4, 1, 4, 6)  # empty batch
    out = cross(q, k, v)
    assert out.shape == (0, 3, 1, 6)
    out.sum().backward()
    assert (q.grad == 0).all()

    q, k, v = _inputs(1, 2, 3, 0, 1, 4, 6)
    out = cross(q, k, v, key_padding_mask=torch.zeros(2, 0, dtype=torch.bool, device=q.device))
    assert out.shape == (2, 3, 1, 6) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all() and k.grad.shape == k.shape and v.grad.shape == v.shape


FUSED = ["FLASH_CPU_FWD", "FLASH_CPU_BWD"]
CHUNKED = ["attention_fwd_chunked", "attention_bwd_chunked"]
# (Bq, B, N, M, H, Dqk, Dv, dropout_p), the forward and backward the "torch" backend runs
CPU_ROUTES = {
    "shared_q-mask": ((1, 3, 6, 11, 2, 8, 8, 0.0), FUSED),
    "D256": ((2, 2, 5, 7, 1, 256, 256, 0.0), FUSED),
    "D261-mask": ((1, 3, 5, 7, 1, 261, 261, 0.0), ["FLASH_CPU_FWD", "attention_bwd_chunked"]),
    "dropout": ((1, 3, 6, 11, 2, 8, 8, 0.2), CHUNKED),
    "Dqk!=Dv": ((1, 3, 6, 11, 2, 8, 5, 0.0), CHUNKED),
    "empty_M": ((1, 3, 6, 0, 2, 8, 8, 0.0), CHUNKED),
}


@pytest.mark.parametrize("name", sorted(CPU_ROUTES))
def test_torch_backend_routes_to_fused_cpu_kernel(name, monkeypatch):
    """The "torch" backend runs SDPA's CPU flash kernel where it has our semantics, else the chunked loop.

    The kernel gets views of the inputs, never copies; a batch-shared q arrives expanded (batch stride 0).
    """
    (Bq, B, N, M, H, Dqk, Dv, p), route = CPU_ROUTES[name]
    KNOBS["backend"] = "torch"
    calls = []
    for fn in CHUNKED + FUSED:
        real = getattr(AC, fn)
        monkeypatch.setattr(AC, fn, lambda *a, _real=real, _fn=fn, **kw: calls.append((_fn, a)) or _real(*a, **kw))
    q, k, v = _inputs(Bq, B, N, M, H, Dqk, Dv, device="cpu")
    mask = _mask(B, M, device="cpu") if M else None
    grad = torch.randn(B, N, H, Dv)
    ours = _run(cross, [q, k, v], grad, key_padding_mask=mask, dropout_p=p)
    assert [fn for fn, _ in calls] == route
    for fn, args in calls:
        if fn in FUSED:  # fwd (q, k, v, ...), bwd (do, q, k, v, ...)
            kq, kk, kv = args[:3] if fn == "FLASH_CPU_FWD" else args[1:4]
            assert [t.data_ptr() for t in (kq, kk, kv)] == [t.data_ptr() for t in (q, k, v)]
            assert kq.shape[0] == B and (Bq == B or kq.stride(0) == 0)
    if p == 0.0:
        _assert_all_close(ours, _reference([q, k, v], grad, key_padding_mask=mask), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dv", [8, 5])
def test_forward_lse(backend, dv):
    """The forward op's lse is the natural-log logsumexp of the scaled scores, +inf where every key is masked."""
    B, N, M, H, D, scale = 3, 6, 11, 2, 8, 0.3
    q, k, v = (t.detach() for t in _inputs(1, B, N, M, H, D, dv))
    mask = _mask(B, M)
    _, lse = A.attention_fwd(q, k, v, mask, None, 0.0, scale, 0, backend)
    s = torch.einsum("bnhd,bmhd->bhnm", q.double().expand(B, -1, -1, -1), k.double()) * scale
    ref = s.masked_fill(~mask[:, None, None], float("-inf")).logsumexp(-1)
    ref[0] = float("inf")  # batch 0 is fully masked
    assert lse.dtype == torch.float32 and lse.shape == (B, H, N)
    torch.testing.assert_close(lse.double(), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------
def _keep_mask(backend, seed, B, H, N, M, p, device):
    if backend == "triton":
        out = torch.empty((B, H, N, M), device=device, dtype=torch.int8)
        _dropout_mask_kernel[(triton.cdiv(N, 16), B * H, triton.cdiv(M, 16))](out, seed, H, N, M, p,
                                                                              BLOCK_N=16, BLOCK_M=16)
        return out.bool()
    return AC.dropout_keep_chunk(seed, 0, (B, H, N, M), p, device)


@triton.jit
def _dropout_mask_kernel(Out, seed, H, N, M, dropout_p, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    # The (B, H, N, M) keep-mask the attention kernels draw. Grid: (cdiv(N, BLOCK_N), B * H, cdiv(M, BLOCK_M)).
    pid_bh = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    keep = AT.dropout_keep(seed, pid_bh, offs_n, offs_m, N, M, dropout_p)
    ptrs = Out + (pid_bh * N + offs_n.to(tl.int64)[:, None]) * M + offs_m[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))


@pytest.mark.parametrize("backend,splits", [("triton", 1), ("triton", 3), ("torch", None)])
def test_dropout_matches_reference_with_same_mask(backend, splits):
    """Forward and backward apply the same mask: rebuild it and compare in float64."""
    KNOBS["backend"] = backend
    KNOBS["num_splits"] = splits or 0
    B, N, M, H, D, p = 2, 17, 23, 2, 8, 0.3
    q, k, v = _inputs(1, B, N, M, H, D, D)
    mask = _mask(B, M, fully_masked_batch=False)
    grad = torch.randn(B, N, H, D, device=q.device)
    torch.manual_seed(5)
    ours = _run(cross, [q, k, v], grad, key_padding_mask=mask, dropout_p=p)
    torch.manual_seed(5)
    seed = int(A.draw_dropout_seed(p).item())
    keep = _keep_mask(backend, seed, B, H, N, M, p, q.device)

    copies = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _run(_masked_reference(mask, keep, p), copies, grad.double())
    _assert_all_close(ours, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_rate(backend):
    """Uniform attention over M keys and v = identity: out[n, j] = keep / ((1 - p) M)."""
    KNOBS["backend"] = backend
    B, N, M, p = 2, 32, 32, 0.25
    q = torch.zeros(1, N, 1, 4, device=_dev())
    k = torch.randn(B, M, 1, 4, device=_dev())
    v = torch.eye(M, device=_dev()).expand(B, M, M).reshape(B, M, 1, M)
    out = cross(q, k, v, dropout_p=p)
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / ((1 - p) * M)))
    rate = kept.float().mean().item()
    assert abs(rate - (1 - p)) < 0.03, rate  # 2048 draws: 3 sigma ~ 0.029


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_reproducible_under_manual_seed(backend):
    KNOBS["backend"] = backend
    q, k, v = [t.detach() for t in _inputs(2, 2, 9, 11, 1, 8, 8)]
    torch.manual_seed(123)
    a = cross(q, k, v, dropout_p=0.5)
    torch.manual_seed(123)
    b = cross(q, k, v, dropout_p=0.5)
    c = cross(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = self_attn(q, q, q, dropout_p=0.0)
    assert torch.equal(d, self_attn(q, q, q))


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
def _bad_cases():
    B, N, M, H, D = 2, 3, 5, 2, 4
    q = torch.randn(B, N, H, D)
    k = torch.randn(B, M, H, D)
    v = torch.randn(B, M, H, D)
    mask = torch.ones(B, M, dtype=torch.bool)
    packed = torch.randn(B, M, H, 2 * D)[..., ::2]
    cases = [
        ("rank", A.cross_attention, (q[0], k, v), {}, ValueError, "q must be 4-D"),
        ("batch", A.cross_attention, (torch.randn(3, N, H, D), k, v), {}, ValueError, "Bq in"),
        ("heads", A.cross_attention, (torch.randn(B, N, 1, D), k, v), {}, ValueError, "q (2, 3, 1, 4)"),
        ("dqk", A.cross_attention, (torch.randn(B, N, H, D + 1), k, v), {}, ValueError, "Dqk=4"),
        ("kv", A.cross_attention, (q, k, torch.randn(B, M + 1, H, D)), {}, ValueError, "v (2, 6, 2, 4)"),
        ("dtype", A.cross_attention, (q, k, v.half()), {}, TypeError, "share a dtype"),
        ("float64", A.cross_attention, (q.double(), k.double(), v.double()), {}, TypeError, "float64"),
        ("stride", A.cross_attention, (q, packed, v), {}, ValueError, "last-dim stride 2"),
        ("mask_dtype", A.cross_attention, (q, k, v), {"key_padding_mask": mask.float()}, TypeError, "bool"),
        ("mask_shape", A.cross_attention, (q, k, v), {"key_padding_mask": mask[:, :3]}, ValueError, "(2, 3)"),
        ("dropout_high", A.cross_attention, (q, k, v), {"dropout_p": 1.0}, ValueError, "dropout_p"),
        ("dropout_neg", A.self_attention, (q, q, q), {"dropout_p": -0.1}, ValueError, "dropout_p"),
        ("head_dim", A.self_attention, (torch.randn(1, 2, 1, 4097),) * 3, {}, ValueError, "D=4097"),
        ("head_dim_cross", A.cross_attention, (torch.randn(1, 2, 1, 4097), torch.randn(1, 2, 1, 4097),
                                               torch.randn(1, 2, 1, 3)), {}, ValueError, "Dqk=4097"),
        ("self_shape", A.self_attention, (q, k, v), {}, ValueError, "must be (B, N, H, D)"),
        ("not_tensor", A.self_attention, (q, q, 3), {}, TypeError, "v must be a torch.Tensor"),
    ]
    if HAS_CUDA:
        cases.append(("device", A.cross_attention, (q, k.cuda(), v), {}, ValueError, "one device"))
        cases.append(("mask_device", A.cross_attention, (q.cuda(), k.cuda(), v.cuda()),
                      {"key_padding_mask": mask}, ValueError, "key_padding_mask is on"))
    return cases


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_errors(case):
    _, fn, args, kw, exc, text = case
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    assert text in str(info.value), str(info.value)



def test_bad_input_errors_name_the_shapes():
    """The spec asks every bad-input error to name the tensor and the shapes."""
    q, k, v = torch.randn(2, 3, 1, 4), torch.randn(2, 5, 1, 4), torch.randn(2, 5, 1, 6)
    cases = [
        ((q, k, v.half()), {}, "v (2, 5, 1, 6)"),
        ((q.double(), k, v), {}, "q (2, 3, 1, 4)"),
        ((q, k, v), {"key_padding_mask": torch.ones(2, 5)}, "key_padding_mask (2, 5)"),
        ((q, torch.randn(2, 5, 1, 4, device="meta"), v), {}, "k (2, 5, 1, 4)"),
        (tuple(t.to("meta") for t in (q, k, v)), {"key_padding_mask": torch.ones(2, 5, dtype=torch.bool)},
         "key_padding_mask (2, 5)"),
        ((torch.randn(1, 2, 1, 4097), torch.randn(1, 2, 1, 4097), torch.randn(1, 2, 1, 3)), {}, "q (1, 2, 1, 4097)"),
    ]
    for args, kw, text in cases:
        with pytest.raises((TypeError, ValueError)) as info:
            cross(*args, **kw)
        assert text in str(info.value), str(info.value)

def test_mixed_devices_error_names_devices():
    q = torch.randn(1, 2, 1, 4)
    k = torch.randn(1, 3, 1, 4, device="meta")
    with pytest.raises(ValueError, match="one device"):
        cross(q, k, k)


# ---------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    KNOBS["backend"] = backend
    q, k, v = [t.detach() for t in _inputs(1, 2, 5, 7, 1, 6, 3)]
    mask = _mask(2, 7)
    seed = torch.tensor([7])
    torch.library.opcheck(torch.ops.perceiver_fast.attention_fwd.default, (q, k, v, mask, seed, 0.2, 0.4, 2, backend))
    torch.library.opcheck(torch.ops.perceiver_fast.attention_fwd.default, (q, k, v, None, None, 0.0, 0.4, 0, backend))
    out, lse = torch.ops.perceiver_fast.attention_fwd(q, k, v, mask, seed, 0.2, 0.4, 1, backend)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.perceiver_fast.attention_bwd.default,
                          (grad, q, k, v, out, lse, mask, seed, 0.2, 0.4, 2, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    KNOBS["backend"] = backend
    q, k, v = _inputs(1, 2, 6, 9, 2, 8, 8)
    mask = _mask(2, 9, fully_masked_batch=False)

    def f(q, k, v):
        x = cross(q, k, v, key_padding_mask=mask, dropout_p=0.1)
        return self_attn(x, x, x).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    loss = compiled(q, k, v)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.manual_seed(1)
    eager_loss = f(q, k, v)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for a, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(a, t.grad)


def test_backend_and_split_validation():
    q, k, v = [t.detach() for t in _inputs(1, 1, 2, 2, 1, 4, 4)]
    with pytest.raises(ValueError, match="backend"):
        A.cross_attention(q, k, v, backend="cuda-please")
    with pytest.raises(ValueError, match="num_splits"):
        A.cross_attention(q, k, v, num_splits=-1)
    with pytest.raises(ValueError, match="sdpa"):
        A.cross_attention(q, k, v, backend="sdpa")



def test_tf32_setting_read_through_the_fp32_precision_api():
    """torch >= 2.9 sets TF32 with ``torch.backends.cuda.matmul.fp32_precision``; after that, reading the
    legacy ``allow_tf32`` raises, so the ops must read the new setting (and never crash on fp32 inputs)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API (older than 2.9)")
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        KNOBS["backend"] = "triton"
        q, k, v = _inputs(1, 1, 3, 5, 1, 4, 4)
        cross(q, k, v).sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
        for prec, want in (("tf32", True), ("ieee", False)):
            matmul.fp32_precision = prec
            assert AT.tf32_allowed() is want
    finally:
        matmul.fp32_precision = saved

# ---------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("case", [(1, 4, 300, 3000, 1, 512, 512), (2, 2, 130, 2000, 1, 261, 261),
                                  (2, 2, 77, 3136, 1, 322, 322), (2, 2, 197, 197, 12, 64, 64),
                                  (1, 2, 256, 1024, 8, 128, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_within_eager_error(case, dtype):
    Bq, B, N, M, H, Dqk, Dv = case
    q, k, v = _inputs(Bq, B, N, M, H, Dqk, Dv, dtype=dtype, device="cuda")
    mask = _mask(B, M, fully_masked_batch=False, device="cuda")
    grad = torch.randn(B, N, H, Dv, device="cuda", dtype=dtype)
    ours = _run(cross, [q, k, v], grad, key_padding_mask=mask)
    eager = _run(attention_reference, [q, k, v], grad, key_padding_mask=mask)
    ref = _reference([q, k, v], grad, key_padding_mask=mask)
    _assert_within_eager(ours, eager, ref, floor=1e-3)


@requires_cuda
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_gpu_fp32_follows_allow_tf32(allow_tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    q, k, v = _inputs(1, 2, 100, 700, 2, 96, 80, device="cuda")
    grad = torch.randn(2, 100, 2, 80, device="cuda")
    ours = _run(cross, [q, k, v], grad)
    ref = _reference([q, k, v], grad)
    if allow_tf32:
        eager = _run(attention_reference, [q, k, v], grad)
        _assert_within_eager(ours, eager, ref, floor=1e-4)
    else:
        _assert_all_close(ours, ref, atol=2e-5, rtol=1e-5)


@requires_cuda
def test_gpu_split_kv_large_m_and_dropout():
    q, k, v = _inputs(1, 2, 64, 20000, 1, 64, 64, device="cuda")
    grad = torch.randn(2, 64, 1, 64, device="cuda")
    KNOBS["num_splits"] = 1 or 0
    one = _run(cross, [q, k, v], grad)
    KNOBS["num_splits"] = None or 0
    auto = _run(cross, [q, k, v], grad)
    _assert_all_close(auto, one, atol=1e-5, rtol=1e-5)
    out = cross(q.detach(), k.detach(), torch.ones_like(v).detach(), dropout_p=0.2)
    assert (out.float().mean() - 1).abs() < 0.02


@requires_cuda
def test_gpu_int64_offsets():
    """B * M * H * D > 2**31 elements in k: the last batch's keys must be addressed correctly."""
    B, M, H, D = 2, 1 << 20, 1, 1040  # 2 * 2**20 * 1040 > 2**31
    k = torch.randn(B, M, H, D, device="cuda", dtype=torch.float16)
    v = torch.randn(B, M, H, 16, device="cuda", dtype=torch.float16)
    q = torch.randn(1, 4, H, D, device="cuda", dtype=torch.float16)
    mask = torch.zeros(B, M, dtype=torch.bool, device="cuda")
    mask[:, -3:] = True
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = cross(q, k, v, key_padding_mask=mask)
    grad = torch.randn_like(out)
    out.backward(grad)
    tails = [t.detach()[:, -3:].double().requires_grad_() for t in (k, v)]
    rq = q.detach().double().requires_grad_()
    ref = attention_reference(rq, *tails)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(q.grad.double(), rq.grad, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(k.grad[:, -3:].double(), tails[0].grad, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(v.grad[:, -3:].double(), tails[1].grad, atol=5e-2, rtol=5e-2)
    assert (k.grad[:, :-3] == 0).all() and (v.grad[:, :-3] == 0).all()
