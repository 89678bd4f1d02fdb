"""The sm_90 compile report (benchmarks/sm90_report.py) with the GPU machine's toolchain, where it is present.

The report compiles every config the autotuner would try for the bench shapes with
triton 3.6.0 and its ptxas (installed aside, not the triton the tests run on) and
reads dot lowering, K/V load path, registers, spills and shared memory. This test
runs it on the cross-attention shapes, with their GQA / causal / softcap variants, and
holds them to the bar of the kernel design: wgmma, K/V by TMA or cp.async, no spills,
shared memory within sm_90's budget.
CI installs the toolchain (.ci/run); elsewhere the test is skipped with the reason.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "sm90_report.py"


def _report_module():
    spec = importlib.util.spec_from_file_location("sm90_report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _toolchain() -> str:
    return os.environ.get("PERCEIVER_FAST_SM90_TOOLCHAIN", _report_module().DEFAULT_TOOLCHAIN)


def test_classify_reads_ptx():
    classify = _report_module().classify
    assert classify("wgmma.mma_async.sync.aligned.m64n64k16 ... cp.async.bulk.tensor.2d") == ("wgmma", "tma")
    assert classify("mma.sync.aligned.m16n8k16 cp.async.cg.shared.global") == ("mma.sync", "cp.async")
    assert classify("fma.rn.f32 ld.global.v4.b32") == ("fma", "ld.global")


def test_tensor_issue_counts_the_main_loop_wgmma_per_warpgroup():
    """Issued tensor FLOPs / minimum: the wgmma shapes of the innermost PTX loop, times the warpgroups."""
    mod = _report_module()
    s_half = "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {...};"
    pv = "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {...};"
    ptx = "\n".join(["wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {...};",  # before the loop: not counted
                     "$L__BB0_1:"] + [s_half] * 64 + [pv] * 4 + ["@%p1 bra $L__BB0_2;", "$L__BB0_2:",
                                                                  "@%p2 bra $L__BB0_1;", "ret;"])
    assert mod.main_loop_wgmma(ptx) == {(64, 32, 16): 64, (64, 256, 16): 4}
    # D512 forward, BLOCK_N 64, BLOCK_M 64, 8 warps: each warpgroup the whole S, half of P.V -> 1.5x
    minimum = mod.fwd_min_tensor_flops(64, 64, 512, 512, 512)
    cols = mod.tensor_issue(ptx, 8, minimum)
    assert cols["warpgroups"] == 2 and cols["wgmma_loop"] == "64x m64n32k16 + 4x m64n256k16"
    assert cols["tensor_issue_ratio"] == 1.5
    assert mod.tensor_issue(ptx, 4, minimum)["tensor_issue_ratio"] == 0.75
    assert mod.tensor_issue("fma.rn.f32", 4)["issued_tensor_flops"] is None


def test_failures_flags_each_criterion():
    failures = _report_module().failures
    good = dict(shape="pio-learned", dot="wgmma", kv_loads="tma", spills=0, smem=200_000)
    entries = [good, dict(good, dot="mma.sync"), dict(good, kv_loads="ld.global"), dict(good, spills=8),
               dict(good, smem=240_000), dict(good, shape="vit-b16", dot="fma")]
    assert failures({"entries": entries}) == entries[1:5]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(_toolchain(), "triton")),
                    reason="the sm_90 toolchain (triton 3.6.0 in a side folder) is not installed here; "
                           "`python benchmarks/sm90_report.py` installs it, and CI does")
def test_sm90_report_cross_attention_meets_the_bar(tmp_path):
    out = tmp_path / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPORT), "--json", str(out), "--check",
                           "--shapes", "pio-learned,pio-fourier,pio-conv", "--toolchain", _toolchain()],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["toolchain"]["triton"] == "3.6.0"
    entries = report["entries"]
    for shape in ("pio-learned", "pio-fourier", "pio-conv"):
        for variant in ("base", "gqa", "causal", "softcap"):
            for direction in ("fwd", "bwd"):
                assert any(e["shape"] == shape and e["variant"] == variant and e["direction"] == direction
                           for e in entries), (shape, variant, direction)
    assert all(set(e) >= {"kernel", "shape", "variant", "direction", "config", "dot", "kv_loads", "regs", "spills",
                          "smem"} for e in entries)


def test_report_compiles_feature_variants_on_the_checked_shapes():
    """GQA, causal and softcap variants on each checked cross-attention shape; feature shapes keep their flags."""
    mod = _report_module()
    from perceiver_fast.bench import shapes as S

    learned = [v[0] for v in mod.shape_variants(S.attn_shape("pio-learned"))]
    assert learned == ["base", "gqa", "causal", "softcap"]
    gqa = dict((v[0], v[1:]) for v in mod.shape_variants(S.attn_shape("pio-conv")))["gqa"]
    assert gqa[0] > gqa[1] and gqa[0] % gqa[1] == 0  # more query heads than key/value heads
    assert mod.shape_variants(S.attn_shape("vit-b16")) == [("base", 12, 12, False, False)]
    assert mod.shape_variants(S.attn_shape("gqa-decoder")) == [("base", 32, 8, True, False)]
