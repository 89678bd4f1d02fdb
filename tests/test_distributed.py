"""perceiver_fast.distributed: cross-attention over keys sharded across gloo ranks (spawned CPU processes, file
rendezvous), input-sharded layers and models, FSDP2; exact forward and gradients against the float64 reference
and the single-process op; the collectives are counted, so a match cannot come from one rank alone.

One spawn per world size runs every job; the tests read what the ranks saved.
"""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed gloo")

# name: (B, Bq, N, H, Hkv, D, Dv, shard sizes, mask kind, backend, dropout_p)
CASES = {
    2: {
        "uneven": (2, 2, 5, 2, 2, 16, 8, [7, 4], None, "torch", 0.0),
        "shared_q_mask_empties_shard_d261": (2, 1, 4, 2, 1, 261, 261, [6, 5], "empty_last", "torch", 0.0),
        "empty_shard_d512": (1, 1, 3, 1, 1, 512, 512, [0, 9], None, "torch", 0.0),
        "triton_interpreter": (2, 1, 3, 2, 2, 16, 16, [3, 2], "empty_last", "triton", 0.0),
        "dropout": (2, 2, 4, 2, 2, 16, 8, [6, 5], "random", "torch", 0.3),
        "dropout_empty_shard_gqa": (2, 1, 4, 4, 2, 16, 16, [0, 9], None, "torch", 0.25),
    },
    3: {
        "uneven_empty_mask_d261": (2, 1, 4, 2, 2, 261, 261, [5, 0, 4], "empty_last", "torch", 0.0),
        "d512": (1, 1, 3, 2, 2, 512, 512, [4, 3, 2], None, "torch", 0.0),
        "triton_interpreter": (1, 1, 3, 2, 2, 16, 8, [2, 0, 3], None, "triton", 0.0),
        "dropout_shared_q": (2, 1, 4, 2, 2, 16, 16, [3, 4, 2], "random", "torch", 0.2),
        "dropout_empty_shard": (2, 2, 3, 2, 1, 16, 8, [4, 0, 5], "random", "torch", 0.3),
        "triton_interpreter_dropout": (2, 1, 3, 2, 2, 16, 8, [2, 0, 5], "random", "triton", 0.3),
    },
}
DROPOUT_SEED = 123
# The ranks seed torch differently: the sharded op takes rank 0's dropout seed (it broadcasts it), so every rank
# must still reproduce the single-device op under torch.manual_seed(DROPOUT_SEED).
RANK_SEED_STRIDE = 1000


def make_case(case):
    """Full fp32 q, k, v, mask and output gradient of a case, the same in every process."""
    B, Bq, N, H, Hkv, D, Dv, sizes, mask_kind, _, _ = case
    M = sum(sizes)
    g = torch.Generator().manual_seed(hash((B, Bq, N, H, D, Dv, tuple(sizes))) % 2**31)
    q = torch.randn(Bq, N, H, D, generator=g)
    k = torch.randn(B, M, Hkv, D, generator=g)
    v = torch.randn(B, M, Hkv, Dv, generator=g)
    dout = torch.randn(B, N, H, Dv, generator=g)
    mask = None
    if mask_kind == "empty_last":  # the last non-empty shard is fully masked; batch 1 (if any) has no key at all
        mask = torch.rand(B, M, generator=g) > 0.3
        mask[:, 0] = True
        last = max(r for r, s in enumerate(sizes) if s > 0)
        mask[:, sum(sizes[:last]):] = False
        if B > 1:
            mask[1] = False
    elif mask_kind == "random":
        mask = torch.rand(B, M, generator=g) > 0.25
        mask[:, 0] = True
    return q, k, v, mask, dout


def shard(t, sizes, rank, dim=1):
    start = sum(sizes[:rank])
    return None if t is None else t.narrow(dim, start, sizes[rank])


# ---------------------------------------------------------------------------------------------------------------
# the jobs every rank runs


def _attention_job(rank, world):
    import perceiver_fast.distributed as D
    from perceiver_fast.ops.attention import cross_attention

    calls = []
    real = D.all_reduce

    def counting(t, op, group=None):
        calls.append(op)
        return real(t, op, group)

    D.all_reduce = counting
    results = {}
    try:
        for name, case in CASES[world].items():
            q, k, v, mask, dout = make_case(case)
            sizes, backend, p = case[7], case[9], case[10]
            q = q.clone().requires_grad_()
            kr = shard(k, sizes, rank).clone().requires_grad_()
            vr = shard(v, sizes, rank).clone().requires_grad_()
            mr = shard(mask, sizes, rank)
            calls.clear()
            torch.manual_seed(DROPOUT_SEED + RANK_SEED_STRIDE * rank)
            out, lse = D.sharded_cross_attention(q, kr, vr, key_padding_mask=mr, dropout_p=p, backend=backend,
                                                 return_lse=True)
            fwd_calls = list(calls)
            out.backward(dout)
            res = dict(out=out.detach(), lse=lse, dq=q.grad, dk=kr.grad, dv=vr.grad, fwd_calls=fwd_calls,
                       bwd_calls=calls[len(fwd_calls):])
            with torch.no_grad():  # this rank's shard alone, on one device
                res["own"] = cross_attention(q, kr, vr, key_padding_mask=mr, backend=backend)
            results[name] = res
    finally:
        D.all_reduce = real
    return results


def _tiny_models():
    from perceiver_fast.models import Perceiver, PerceiverIO

    return {
        "pio_fourier": (lambda **kw: PerceiverIO(image_size=4, in_channels=2, num_classes=3, preprocessing="fourier",
                                                 num_latents=3, latent_dim=8, num_blocks=1,
                                                 num_self_attends_per_block=1, self_heads=2, cross_heads=1,
                                                 num_bands=2, **kw), False),
        "pio_learned_unfolded_mask": (lambda **kw: PerceiverIO(image_size=4, in_channels=1, num_classes=3,
                                                               preprocessing="learned", prep_channels=4,
                                                               pos_channels=4, num_latents=3, latent_dim=8,
                                                               num_blocks=1, num_self_attends_per_block=1,
                                                               self_heads=2, cross_heads=2, fold=False, **kw), True),
        "perceiver": (lambda **kw: Perceiver(image_size=8, patch_size=2, in_channels=1, num_classes=3,
                                             num_latents=3, latent_dim=8, self_heads=2, depth=1, num_iterations=2,
                                             **kw), False),
    }


def _model_inputs(name):
    g = torch.Generator().manual_seed(5)
    channels, size = (2, 4) if name == "pio_fourier" else (1, 4 if name.startswith("pio") else 8)
    return torch.randn(2, channels, size, size, generator=g)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _models_job(rank, world):
    out = {}
    for name, (build, masked) in _tiny_models().items():
        x = _model_inputs(name)
        mask = None
        if masked:  # the last rank's positions all masked for image 0
            mask = torch.ones(2, 16, dtype=torch.bool)
            mask[0, 16 - 16 // world:] = False
        res = {}
        for sharded in (False, True):
            torch.manual_seed(0)
            model = build(input_group=dist.group.WORLD if sharded else None)
            logits = model(x, mask) if masked else model(x)
            (logits * torch.arange(1.0, 4.0)).sum().backward()
            res["sharded" if sharded else "single"] = dict(logits=logits.detach(), grads=_grads(model))
        out[name] = res
    return out


def _fsdp_job(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn import functional as F

    from perceiver_fast.models import PerceiverIO

    def build():
        torch.manual_seed(0)
        return PerceiverIO(image_size=4, in_channels=1, num_classes=3, preprocessing="fourier", num_latents=3,
                           latent_dim=8, num_blocks=1, num_self_attends_per_block=2, self_heads=2, num_bands=2)

    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(4, 1, 4, 4, generator=g), torch.tensor([0, 1, 2, 1])
    single = build()
    F.cross_entropy(single(x), y).backward()
    model = build()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.self_attends:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    half = x.shape[0] // world
    F.cross_entropy(model(x[rank * half:(rank + 1) * half]), y[rank * half:(rank + 1) * half]).backward()
    sharded = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    return dict(single=_grads(single), fsdp=sharded, is_dtensor=type(next(model.parameters())).__name__)


def _worker(rank, world, rendezvous, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        results = {"attention": _attention_job(rank, world)}
        # The Triton cases are done: the models run the ops' PyTorch path (the backend is chosen at call time).
        os.environ["TRITON_INTERPRET"] = "0"
        results["models"] = _models_job(rank, world)
        if world == 2:
            results["fsdp"] = _fsdp_job(rank, world)
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(_worker, args=(world, str(tmp / "rendezvous"), str(tmp)), nprocs=world, join=True)
    return world, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ---------------------------------------------------------------------------------------------------------------
# sharded_cross_attention


def _single_keep(q, k, mask, p, backend):
    """The single-device op's dropout keep-mask (B, N, H, M) under torch.manual_seed(DROPOUT_SEED).

    Values = one-hot rows: the output is P * keep / (1 - p), positive exactly where a key is attended and kept.
    """
    from perceiver_fast.ops.attention import draw_dropout_seed

    torch.manual_seed(DROPOUT_SEED)
    seed = draw_dropout_seed(p)
    M = k.shape[1]
    eye = torch.eye(M)[None, :, None, :].expand(k.shape[0], -1, k.shape[2], -1).contiguous()
    out, _ = torch.ops.perceiver_fast.attention_fwd(q, k, eye, mask, seed, p, q.shape[-1] ** -0.5, 0, backend)
    return out > 0


def _reference(q, k, v, mask, dout, keep=None, p=0.0):
    """float64 (out, dq, dk, dv); with ``keep`` the dropout mask (B, N, H, M) of the global softmax."""
    from perceiver_fast.ops.reference import attention_reference

    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    if keep is None:
        out = attention_reference(q, k, v, key_padding_mask=mask)
    else:
        H, Hkv = q.shape[2], k.shape[2]
        kk, vv = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        s = torch.einsum("bnhd,bmhd->bnhm", q.expand(k.shape[0], -1, -1, -1), kk) * q.shape[-1] ** -0.5
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, :], -math.inf)
        P = torch.softmax(s, -1).nan_to_num(0.0) * keep.double() / (1 - p)
        out = torch.einsum("bnhm,bmhd->bnhd", P, vv)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _all_cases(world):
    return list(CASES[world].items())


def test_sharded_matches_float64_reference_and_single_process(ranks):
    from perceiver_fast.ops.attention import cross_attention

    world, res = ranks
    for name, case in _all_cases(world):
        backend, p = case[9], case[10]
        per = [r["attention"][name] for r in res]
        q, k, v, mask, dout = make_case(case)
        for r in per[1:]:  # the output and dq are replicated, bit for bit
            assert torch.equal(r["out"], per[0]["out"]) and torch.equal(r["dq"], per[0]["dq"]), name
        out, dq = per[0]["out"], per[0]["dq"]
        dk, dv = torch.cat([r["dk"] for r in per], 1), torch.cat([r["dv"] for r in per], 1)
        keep = _single_keep(q, k, mask, p, backend) if p > 0 else None
        ref = _reference(q, k, v, mask, dout, keep, p)
        tol = dict(atol=2e-5, rtol=1e-5) if case[5] < 256 else dict(atol=5e-5, rtol=1e-4)
        for got, want, what in zip((out, dq, dk, dv), ref, ("out", "dq", "dk", "dv")):
            torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{name} {what}: {m}")
        if case[8] == "empty_last" and case[0] > 1:  # batch 1 has no key on any rank: zeros, lse +inf
            assert out[1].abs().max() == 0 and per[0]["lse"][1].isposinf().all(), name
        # The single-process op, same backend and (with dropout) same seed: within fp32 rounding.
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        torch.manual_seed(DROPOUT_SEED)
        single = cross_attention(qs, ks, vs, key_padding_mask=mask, dropout_p=p, backend=backend)
        single.backward(dout)
        for got, want, what in zip((out, dq, dk, dv), (single, qs.grad, ks.grad, vs.grad),
                                   ("out", "dq", "dk", "dv")):
            torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{name} {what} vs single process: {m}")
        if p > 0:  # dropout really dropped: the dropout-free op differs
            torch.manual_seed(DROPOUT_SEED)
            plain = cross_attention(q, k, v, key_padding_mask=mask, backend=backend)
            assert not torch.allclose(plain, out, atol=1e-3), name


def test_the_collectives_ran(ranks):
    world, res = ranks
    for name, case in _all_cases(world):
        sizes = case[7]
        for rank, r in enumerate(res):
            a = r["attention"][name]
            # with dropout first the key counts and rank 0's seed; the lse max, then [weighted partials | weights]
            assert a["fwd_calls"] == (["sum"] if case[10] > 0 else []) + ["max", "sum"], name
            assert a["bwd_calls"] == ["sum"], name  # dq, once
            others = sum(s for i, s in enumerate(sizes) if i != rank)
            if others and case[8] != "empty_last":
                # this rank's shard alone is a different attention: the other ranks' keys were merged in
                assert not torch.allclose(a["own"], a["out"], atol=1e-4), (name, rank)


def test_sharded_without_process_group_is_the_op(monkeypatch):
    from perceiver_fast.distributed import shard_bounds, sharded_cross_attention
    from perceiver_fast.ops.attention import cross_attention

    q, k, v, mask, _ = make_case(CASES[2]["dropout"][:10] + (0.0,))
    torch.testing.assert_close(sharded_cross_attention(q, k, v, key_padding_mask=mask, backend="torch"),
                               cross_attention(q, k, v, key_padding_mask=mask, backend="torch"), rtol=0, atol=0)
    for backend in ("torch", "triton"):  # dropout: the op's own draw, bit for bit
        torch.manual_seed(DROPOUT_SEED)
        got = sharded_cross_attention(q, k, v, key_padding_mask=mask, dropout_p=0.3, backend=backend)
        torch.manual_seed(DROPOUT_SEED)
        want = cross_attention(q, k, v, key_padding_mask=mask, dropout_p=0.3, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [shard_bounds(7, 3, r) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [shard_bounds(2, 3, r) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
    with pytest.raises(ValueError, match="key_padding_mask"):
        sharded_cross_attention(q, k, v, key_padding_mask=mask[:, :3], backend="torch")


# ---------------------------------------------------------------------------------------------------------------
# layers and models with input_group, FSDP2


def test_input_sharded_models_match_one_process(ranks):
    world, res = ranks
    for name in _tiny_models():
        single = res[0]["models"][name]["single"]
        for rank, r in enumerate(res):
            sharded = r["models"][name]["sharded"]
            torch.testing.assert_close(sharded["logits"], single["logits"], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{name} rank {rank} logits: {m}")
            assert sharded["grads"].keys() == single["grads"].keys(), name
            for p, g in single["grads"].items():
                torch.testing.assert_close(sharded["grads"][p], g, atol=1e-5, rtol=1e-4,
                                           msg=lambda m: f"{name} rank {rank} grad {p}: {m}")
            for p, g in res[0]["models"][name]["sharded"]["grads"].items():  # every rank the same gradients
                torch.testing.assert_close(sharded["grads"][p], g, atol=1e-6, rtol=1e-6)


def test_input_group_needs_fused_attention():
    from perceiver_fast.layers.attention import CrossAttention

    with pytest.raises(ValueError, match="input_group"):
        CrossAttention(8, 8, attention="eager", input_group=object())


def test_fsdp2_gradients_match_one_process(ranks):
    world, res = ranks
    if world != 2:
        pytest.skip("FSDP2 runs in the 2-rank spawn")
    for r in res:
        f = r["fsdp"]
        assert f["is_dtensor"] == "DTensor"
        assert f["fsdp"].keys() == f["single"].keys()
        for p, g in f["single"].items():
            torch.testing.assert_close(f["fsdp"][p], g, atol=1e-6, rtol=1e-5, msg=lambda m: f"{p}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# perceiver-fast train under torchrun


def test_train_under_torchrun_matches_one_process(tmp_path):
    import json
    import subprocess
    import sys

    from helpers import ROOT

    from perceiver_fast.train import TrainConfig, train

    args = dict(model="perceiver-io", size="tiny", epochs=1, limit=60, global_batch_size=16, shift=1)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "perceiver_fast", "train", "--device", "cpu", "--out", str(tmp_path / "ddp")]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "DDP world 2" in p.stdout
    ddp = json.load(open(tmp_path / "ddp" / "metrics.json"))
    assert ddp["world_size"] == 2
    assert sorted(f for f in os.listdir(tmp_path / "ddp") if f.endswith(".safetensors")) == ["model.safetensors"]
    # the same global batches, seed and steps in one process (the op's PyTorch path, as in the ranks)
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        single = train(TrainConfig(device="cpu", out=str(tmp_path / "one"), quiet=True, **args))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    assert len(ddp["step_losses"]) == len(single["step_losses"]) == 3  # 48 training images, batch 16
    torch.testing.assert_close(torch.tensor(ddp["step_losses"]), torch.tensor(single["step_losses"]),
                               rtol=1e-4, atol=1e-5)
    for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
        assert math.isclose(ddp["history"][-1][key], single["history"][-1][key], rel_tol=1e-4, abs_tol=1e-5), key


def test_train_refuses_a_world_size_that_does_not_divide_the_global_batch(monkeypatch, tmp_path):
    from perceiver_fast.train import TrainConfig, check_config

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="global_batch_size 16 is not divisible by the world size 3"):
        check_config(TrainConfig(global_batch_size=16, out=str(tmp_path / "x")))
    check_config(TrainConfig(global_batch_size=18, out=str(tmp_path / "x")))
