"""The bench harness: FLOP/byte counts against hand computations, inputs and
backends on CPU, the runner's row schema, speedups, targets, and the writers."""
import csv
import json
import math

import pytest
import torch

import perceiver_fast.ops.fourier

from perceiver_fast.bench import shapes as S
from perceiver_fast.bench.backends import attn_backend, attn_inputs, attn_reference64
from perceiver_fast.bench.report import write_all
from perceiver_fast.bench.runner import BenchOptions, add_speedups, run
from perceiver_fast.bench.schema import ROW_FIELDS, make_row
from perceiver_fast.bench.targets import evaluate


def test_flops_and_bytes_of_pio_learned_by_hand():
    s = S.attn_shape("pio-learned")
    # QK^T: 2*N*M*D per batch, PV: 2*N*M*Dv -> 2 * 8 * 512 * 50176 * (512 + 512)
    assert s.flops() == 2 * 8 * 512 * 50176 * 1024 == 420_906_795_008
    assert s.flops(backward=True) == int(420_906_795_008 * 3.5)
    q = o = 8 * 512 * 512
    k = v = 8 * 50176 * 512
    assert s.bytes("bfloat16") == (q + k + v + o) * 2 == 830_472_192
    assert s.bytes("float32") == 2 * s.bytes("bfloat16")
    assert s.bytes("bfloat16", backward=True) == 2 * s.bytes("bfloat16")
    # floor: compute-bound at 700 TFLOP/s: 420.9e9 / 700e12 s = 0.6013 ms (memory: 0.194 ms)
    assert s.floor_ms("bfloat16") == pytest.approx(420_906_795_008 / 700e12 * 1e3)
    assert 830_472_192 / 4250e9 * 1e3 < s.floor_ms("bfloat16")


def test_flops_of_self_attention_and_fourier_by_hand():
    vit = S.attn_shape("vit-b16")
    assert vit.flops() == 2 * 64 * 12 * 197 * 197 * (64 + 64)
    assert vit.bytes("bfloat16") == 4 * 64 * 197 * 12 * 64 * 2
    f = S.FOURIER_SHAPES[0]
    assert f.out_channels == 3 + 2 + 2 * 2 * 64 == 261
    assert f.bytes("float32") == 32 * 224 * 224 * (3 + 261) * 4
    # memory bound: bytes / 4250 GB/s
    assert f.floor_ms() == pytest.approx(32 * 50176 * 264 * 4 / 4250e9 * 1e3)


def test_fourier_kv_stride_shape_and_small_versions():
    s = S.attn_shape("pio-fourier-s272")
    assert (s.Dqk, s.kv_row_stride) == (261, 272)
    small = s.small()
    assert (small.H, small.Dqk, small.Dv, small.kv_row_stride) == (1, 261, 261, 272)
    assert small.M <= 1024 and small.B <= 2
    assert S.model_case("vit-b16").small().batch <= 2
    with pytest.raises(KeyError, match="unknown attention shape"):
        S.attn_shape("nope")


def test_eager_memory_estimate_is_the_score_matrix_sized():
    s = S.SWEEP_BASE.replace(M=200704)
    # attention_reference in bf16: scores (2 B) + softmax (2 B)
    assert s.eager_extra_bytes("bfloat16") == 8 * 512 * 200704 * 4
    assert s.eager_extra_bytes("bfloat16", backward=True) == 2 * s.eager_extra_bytes("bfloat16")


def test_strided_inputs_and_backends_agree_on_cpu():
    shape = S.attn_shape("pio-fourier-s272").replace(B=2, N=16, M=48)
    inp = attn_inputs(shape, "float32", "cpu")
    assert inp["k"].shape == (2, 48, 1, 261)
    assert inp["k"].stride() == (48 * 272, 272, 261, 1)
    ref = attn_reference64(inp, shape)
    for name in ("eager", "sdpa-math"):
        out = attn_backend(name, shape)(inp)
        assert out.shape == (2, 16, 1, 261)
        err = ((out[:1].double() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (name, err)


def test_sdpa_refusal_is_recorded_as_fail_not_raised():
    opts = BenchOptions(device="cpu", quick=True, ops=["keras"], models=[], backends=["eager", "sdpa-cudnn"],
                        progress=False)
    res = run(opts, log=lambda *_: None)
    rows = res["rows"]
    assert {r["backend"] for r in rows} == {"eager", "sdpa-cudnn"}
    assert all(set(r) == set(ROW_FIELDS) for r in rows)
    cudnn = [r for r in rows if r["backend"] == "sdpa-cudnn"]
    assert cudnn and all(r["status"] == "FAIL" and r["reason"] for r in cudnn)
    eager = [r for r in rows if r["backend"] == "eager"]
    assert {r["direction"] for r in eager} == {"fwd", "fwd+bwd"}
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["speedup_vs_eager"] == 1.0 for r in eager)
    assert eager[0]["relerr"] < 1e-5


def test_cpu_run_leaves_out_cuda_only_sdpa_backends():
    """A newcomer's CPU run shows no "FAIL No viable backend" rows for kernels a CPU does not have."""
    opts = BenchOptions(device="cpu", quick=True, ops=["keras"], models=[], progress=False)
    from perceiver_fast.bench.ops import attn_backends

    chosen = attn_backends(opts, with_compile=False)
    assert "sdpa-cudnn" not in chosen and "sdpa-efficient" not in chosen
    assert {"eager", "sdpa-math", "sdpa-flash", "fused"} <= set(chosen)


def test_small_model_labels_say_what_ran():
    small = S.ModelCase("vit-b16", "vit", 64, note="ViT-B/16", small_note="ViT, tiny config").small()
    assert small.note == "ViT, tiny config" and small.image_size == 32 and small.batch == 2
    for case in S.MODEL_CASES:
        assert "224" not in case.small().note


def test_speedups_and_targets_on_synthetic_rows():
    def r(backend, ms, mib=None, direction="fwd", name="pio-learned"):
        return make_row(section="op", name=name, direction=direction, dtype="bfloat16", backend=backend,
                        status="ok", ms=ms, peak_mib=mib)

    rows = [r("eager", 1.2, 788), r("sdpa-efficient", 4.0, 12), r("sdpa-math", 12.0), r("fused", 1.0, 30),
            make_row(section="op", name="pio-learned", direction="fwd", dtype="bfloat16", backend="sdpa-flash",
                     status="FAIL", reason="No available kernel")]
    add_speedups(rows)
    fused = rows[3]
    assert fused["speedup_vs_eager"] == pytest.approx(1.2)
    assert fused["speedup_vs_best_sdpa"] == pytest.approx(4.0)
    res = evaluate(rows)
    assert len(res) == 1 and res[0]["verdict"] == "MET"  # 1.2x eager, 30/788 = 3.8% of its memory
    rows[3]["peak_mib"] = 100.0  # 12.7% of eager's memory: misses the 5% bound
    assert evaluate(rows)[0]["verdict"] == "MISSED"


def test_writers_produce_parseable_csv_json_and_png(tmp_path):
    opts = BenchOptions(device="cpu", quick=True, ops=["sweep"], models=[], backends=["eager", "sdpa-math"],
                        progress=False)
    res = run(opts, log=lambda *_: None)
    paths = write_all(res, str(tmp_path))
    with open(paths["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0]) == ROW_FIELDS
    assert {r["section"] for r in rows} == {"sweep"}
    data = json.load(open(paths["json"]))
    for key in ("date", "torch", "triton", "git_commit", "device", "gpu", "fused_path"):
        assert key in data["env"]
    assert data["env"]["fused_path"] in ("torch", "triton-interpreter")
    assert len(data["rows"]) == len(rows)
    assert all(r["ms"] is None or math.isfinite(r["ms"]) for r in data["rows"])
    with open(paths["plot_sweep"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "not evaluated" in open(paths["targets"]).read()


def test_full_gpu_plan_without_a_gpu():
    """The job list a full H200 run would execute (built, not run): every section, full sizes, bf16."""
    from perceiver_fast.bench.peer import PEER_CASES
    from perceiver_fast.bench.runner import build_jobs

    opts = BenchOptions(device="cuda").resolved()
    assert (opts.dtype, opts.small, opts.compile_fourier, opts.compile_attention) == ("bfloat16", False, True, False)
    jobs = build_jobs(opts)
    count = {}
    for j in jobs:
        count[j.section] = count.get(j.section, 0) + 1
    n_attn_backends = 6  # eager, 4 SDPA backends, fused (+ fused-triton for self-attention)
    op_shapes = S.ATTN_SHAPES + S.FEATURE_SHAPES
    n_self = sum(s.op == "self" for s in op_shapes)
    assert count == {"ceiling": 2, "op": len(op_shapes) * n_attn_backends + n_self + 3, "layer": 3 * 3,
                     "model": 3 * 3 + 4, "sweep": len(S.SWEEP_M) * n_attn_backends,
                     "headdim": len(S.HEADDIM_D) * n_attn_backends, "fit": n_attn_backends,
                     "peer": len(PEER_CASES)}  # one job per community model (patched, unpatched, flash-perceiver)
    order = [j.section for j in jobs]
    assert order.index("model") < order.index("peer") < order.index("sweep")  # a budget cut drops the sweeps first


def test_memory_guard_skips_what_would_not_fit(monkeypatch):
    from perceiver_fast.bench import ops as runner

    monkeypatch.setattr(runner, "free_bytes", lambda device: 2 * 2**30)
    big = S.SWEEP_BASE.replace(M=200704)  # ~3.1 GiB of scores + softmax for eager in bf16
    assert "skipped: needs" in runner.memory_guard(big, "eager", "bfloat16", False, "cuda")
    assert runner.memory_guard(big, "fused", "bfloat16", False, "cuda") is None
    assert runner.memory_guard(S.SWEEP_BASE.replace(M=1024), "sdpa-math", "bfloat16", True, "cuda") is None


def test_budget_cut_records_skips_and_still_writes(tmp_path):
    res = run(BenchOptions(device="cpu", ops=["keras"], models=[], budget_s=-1.0, progress=False),
              log=lambda *_: None)
    assert res["rows"] and all(r["status"] == "SKIP" and "time budget" in r["reason"] for r in res["rows"])
    paths = write_all(res, str(tmp_path))
    assert len(list(csv.DictReader(open(paths["csv"])))) == len(res["rows"])


@pytest.mark.parametrize("concat_pos,sine_only", [(True, False), (False, False), (True, True), (False, True)])
def test_fourier_shape_channels_follow_the_flags(concat_pos, sine_only):
    f = S.FOURIER_SHAPES[0].replace(concat_pos=concat_pos, sine_only=sine_only, index_dims=(3, 4), num_bands=5, B=1)
    x = torch.randn(1, 3, 4, f.cin)
    out = perceiver_fast.ops.fourier.fourier_encode(x, 5, concat_pos=concat_pos, sine_only=sine_only)
    assert out.shape[-1] == f.out_channels


def test_op_rows_report_spread_and_check_gradients():
    # eager only: in this process "fused" runs the Triton interpreter (test_cli times it on the torch path)
    opts = BenchOptions(device="cpu", quick=True, ops=["keras"], models=[], backends=["eager", "sdpa-math"],
                        progress=False)
    rows = run(opts, log=lambda *_: None)["rows"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ms_p20"] <= r["ms"] <= r["ms_p80"]
    bwd = [r for r in rows if r["direction"] == "fwd+bwd" and r["backend"] == "eager"]
    assert all(r["grad_relerr"] is not None and r["grad_relerr"] < 1e-4 for r in bwd), bwd


def test_wrong_gradients_are_marked_wrong(monkeypatch):
    from perceiver_fast.bench import ops

    real = ops.grads_reference64
    monkeypatch.setattr(ops, "grads_reference64", lambda inp: [2 * g for g in real(inp)])
    shape = S.attn_shape("keras").small().replace(B=1, N=8, M=16)
    opts = BenchOptions(device="cpu", quick=True).resolved()
    fwd, bwd = ops.attn_case_rows(shape, "eager", opts, "op", True)
    assert fwd["status"] == "ok" and bwd["status"] == "WRONG" and "gradient relative error" in bwd["reason"]


def test_headdim_sweep_and_largest_m(monkeypatch):
    from perceiver_fast.bench import ops

    monkeypatch.setattr(ops, "FIT_MAX_M_CPU", 4096)
    opts = BenchOptions(device="cpu", quick=False, ops=["headdim", "fit"], models=[], backends=["eager"],
                        progress=False)
    rows = run(opts, log=lambda *_: None)["rows"]
    head = [r for r in rows if r["section"] == "headdim"]
    assert sorted(r["Dqk"] for r in head) == sorted(S.HEADDIM_D) and all(r["status"] == "ok" for r in head)
    (fit,) = [r for r in rows if r["section"] == "fit"]
    assert fit["status"] == "ok" and fit["M"] == 4096 and "cap" in fit["reason"]


def test_compare_reports_changes_and_flags_regressions():
    from perceiver_fast.bench.compare import compare

    def r(backend, ms):
        return make_row(section="op", name="keras", direction="fwd", dtype="float32", backend=backend,
                        status="ok", ms=ms)

    old = [r("eager", 1.0), r("fused", 1.0)]
    lines, bad = compare(old, [r("eager", 1.05), r("fused", 1.5)], threshold=0.1)
    assert [b["backend"] for b in bad] == ["fused"] and any("+50.0%" in line for line in lines)
    assert compare(old, [r("eager", 0.5), r("fused", 1.09)], threshold=0.1)[1] == []


def test_compare_cli_exit_status(tmp_path):
    from perceiver_fast.cli import main

    args = ["bench", "--quick", "--ops", "keras", "--models", "none", "--backends", "eager", "--no-backward",
            "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    old = json.load(open(tmp_path / "a" / "results.json"))
    for row in old["rows"]:
        row["ms"] = row["ms"] / 100  # the old run was 100x faster: a regression
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(args + ["--out", str(tmp_path / "b"), "--compare", str(tmp_path / "old.json")]) == 1
    for row in old["rows"]:
        row["ms"] = row["ms"] * 10000  # now 100x slower: an improvement
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(args + ["--out", str(tmp_path / "c"), "--compare", str(tmp_path / "old.json")]) == 0
    assert main(args + ["--out", str(tmp_path / "d"), "--compare", str(tmp_path / "nope.json")]) == 2


def test_feature_shapes_count_visible_pairs_and_kv_heads():
    """Causal shapes count the visible (query, key) pairs (bottom-right); GQA shapes read Hkv heads of K/V."""
    dec = S.attn_shape("gqa-decoder")
    assert (dec.H, dec.kv_heads, dec.causal) == (32, 8, True) and dec.has_features
    n = 2048
    assert dec.flops() == 2 * 4 * 32 * (n * (n + 1) // 2) * (128 + 128)
    e = 2
    q = o = 4 * n * 32 * 128
    kv = 2 * 4 * n * 8 * 128
    assert dec.bytes("bfloat16") == (q + o + kv) * e
    par = S.attn_shape("par-causal")
    assert par.op == "cross" and par.causal and (par.N, par.M) == (1024, 8192)
    assert par.visible_pairs() == sum(min(8192, i + 8192 - 1024 + 1) for i in range(1024))
    assert S.AttnShape("x", "cross", 1, 1, 5, 3, 8, 8, causal=True).visible_pairs() == 1 + 2 + 3  # rows 0, 1 empty
    assert not S.attn_shape("pio-learned").has_features and "Hkv8 causal" in dec.label()


@pytest.mark.parametrize("name", [s.name for s in S.FEATURE_SHAPES])
def test_feature_shape_rows_on_cpu(name):
    """GQA and causal rows: eager (attention_reference with the same flags) and the fused op agree with
    float64, forward and gradients; SDPA records FAIL where it cannot express the mask (cross, N != M)."""
    from perceiver_fast.bench import ops

    shape = S.attn_shape(name).small().replace(B=1, N=16, M=16 if S.attn_shape(name).op == "self" else 40)
    opts = BenchOptions(device="cpu", quick=True).resolved()
    for backend in ("eager", "fused"):
        fwd, bwd = ops.attn_case_rows(shape, backend, opts, "op", True)
        assert fwd["status"] == "ok" and fwd["relerr"] < 1e-5, fwd
        assert bwd["status"] == "ok" and bwd["grad_relerr"] < 1e-4, bwd
        assert fwd["flops"] == shape.flops()
    sdpa = ops.attn_case_rows(shape, "sdpa-math", opts, "op", False)[0]
    assert sdpa["status"] == ("ok" if shape.op == "self" else "FAIL"), sdpa
