"""Ahead-of-time compilation of the attention kernels for an sm_90 target.

The interpreter runs the kernels' semantics on CPU but never lowers them, so a
kernel that only fails in the GPU compiler (types of loop-carried values,
dot shapes, shared memory beyond the H200's 232,448 bytes) would go unnoticed
on a machine without a GPU. This test compiles every forward config and one
backward config per kernel to a cubin with triton's bundled ptxas, in a
subprocess without TRITON_INTERPRET (which would replace @triton.jit).

The wide value-tile forward configs (BLOCK_DV 256/512, perf-notes A1) are also
compiled as the GPU would specialise them for the shapes they are kept for by
``_prune_fwd_configs`` (bf16, no mask, no dropout; aligned: strides and head
dims divisible by 16, as for D256/D512; unaligned: row strides 261/322). Their
registers and spills come from ``ptxas -v`` on the kernel's PTX (the compiled
kernel's n_regs/n_spills are only filled in when it is loaded on a device) and
must show no spills. So must the wide backward configs (column tiles of
BLOCK_DT 128/256/512 wider than the BLOCK_D reduction chunk, perf-notes B1),
both kernels, for aligned D512 and unaligned D261/D322 in bf16. Run with
``-s`` to see the table.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = 232_448  # bytes of shared memory per block on sm_90

SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nv
from perceiver_fast.ops import attention_kernels as AK

target = GPUTarget("cuda", 90, 32)
out = []

def ptxas_usage(compiled):
    # (registers, spill bytes stored + loaded) of the kernel, from ptxas -v on its PTX.
    try:
        ptxas = nv.get_ptxas(90).path
    except TypeError:  # older triton: get_ptxas() without an arch
        ptxas = nv.get_ptxas().path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        for extra in (["--regAllocOptLevel=2"], []):  # triton's own flag for ptxas 13.x
            proc = subprocess.run([ptxas, "-v", *extra, "--gpu-name=sm_90a", src, "-o", src + ".o"],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                break
    log = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        return None, None
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))

def build(kernel, types, consts, cfg_opts, label, attrs=None, usage=False, kind="other"):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig,
                                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                                    attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in attrs or ()})
    compiled = triton.compile(src, target=target, options=cfg_opts)
    regs, spills = ptxas_usage(compiled) if usage else (None, None)
    out.append([label, compiled.metadata.shared, regs, spills, kind])

for dt, prec, cfgs in (("fp16", "ieee", AK._fwd_configs()), ("fp32", "tf32", AK._fwd_configs()[:1]),
                       ("fp32", "ieee", AK._fwd_configs()[:1])):
    for cfg in cfgs:
        types = {"Q": "*" + dt, "K": "*" + dt, "V": "*" + dt, "Mask": "*u8", "Out": "*fp32", "Lse": "*fp32",
                 "seed": "i64", "scale_log2": "fp32", "dropout_p": "fp32"}
        consts = dict(HAS_MASK=True, DROPOUT=True, SPLIT=True, PRECISION=prec, **cfg.kwargs)
        build(AK._attn_fwd_kernel, types, consts, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
              f"fwd {dt} {prec} mask+dropout {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}", usage=(dt == "fp16"))

# Wide value tiles, specialised as for the shapes that keep them (after _prune_fwd_configs).
# (name, Dv, aligned, SPLIT as choose_num_splits gives on 132 SMs)
SHAPES = (("keras B64 N256 M1024 D256", 256, True, False), ("pio-learned D512", 512, True, True),
          ("pio-fourier D261 stride 261", 261, False, True), ("pio-conv D322 M3136", 322, False, True))
fn = AK._attn_fwd_kernel.fn
wide = [c for c in AK._fwd_configs() if c.kwargs["BLOCK_DV"] > AK._NARROW_DV]
assert wide, "no wide value-tile configs"
done = {}
for name, dv, aligned, split in SHAPES:
    kept = AK._prune_fwd_configs(AK._fwd_configs(), {"DV_BUCKET": AK._bucket(dv), "DQK_BUCKET": AK._bucket(dv)})
    for cfg in kept:
        if cfg.kwargs["BLOCK_DV"] <= AK._NARROW_DV:
            continue
        key = (str(cfg), aligned, split)
        if key in done:
            out[done[key]][0] += " + " + name
            continue
        attrs = [n for n in fn.arg_names if n in ("Q", "K", "V", "Mask", "Out", "Lse", "N", "M")]
        if aligned:
            attrs += [n for n in fn.arg_names if n.startswith("stride") and n != "stride_maskb"] + ["Dqk", "Dv"]
        types = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Mask": "*u8", "Out": "*fp32" if split else "*bf16",
                 "Lse": "*fp32", "seed": "i64", "scale_log2": "fp32", "dropout_p": "fp32"}
        consts = dict(HAS_MASK=False, DROPOUT=False, SPLIT=split, PRECISION="ieee", **cfg.kwargs)
        done[key] = len(out)
        build(AK._attn_fwd_kernel, types, consts, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
              f"fwd bf16 {'aligned' if aligned else 'unaligned'} split={split} {cfg.kwargs} w{cfg.num_warps} "
              f"s{cfg.num_stages}: {name}", attrs=attrs, usage=True, kind="wide")
for cfg in wide:  # fp32 inputs may autotune them too: shared memory only (the autotuner skips OutOfResources)
    types = {"Q": "*fp32", "K": "*fp32", "V": "*fp32", "Mask": "*u8", "Out": "*fp32", "Lse": "*fp32",
             "seed": "i64", "scale_log2": "fp32", "dropout_p": "fp32"}
    consts = dict(HAS_MASK=False, DROPOUT=False, SPLIT=True, PRECISION="tf32", **cfg.kwargs)
    build(AK._attn_fwd_kernel, types, consts, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
          f"fwd fp32 tf32 unaligned {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}", usage=True)
# Backward wide column tiles (BLOCK_DT > BLOCK_D or > 128, perf-notes B1), both kernels, specialised
# as for the shapes that keep them after _prune_bwd_configs (bf16, no mask, no dropout).
BWD_SHAPES = (("pio-learned D512", 512, True), ("pio-fourier D261 stride 261", 261, False),
              ("pio-conv D322 M3136", 322, False))
bwd_wide = [c for c in AK._bwd_configs() if c.kwargs["BLOCK_DT"] > AK._NARROW_DV
            or c.kwargs["BLOCK_DT"] != c.kwargs["BLOCK_D"]]
assert bwd_wide, "no wide backward configs"
done = {}
for name, d, aligned in BWD_SHAPES:
    buckets = {"DQK_BUCKET": AK._bucket(d), "DV_BUCKET": AK._bucket(d)}
    kept = AK._prune_bwd_configs(AK._bwd_configs(), buckets)
    assert AK._prune_bwd_configs(AK._bwd_configs(), buckets, dims=("DQK_BUCKET",)) == kept  # Dqk == Dv here
    for cfg in kept:
        if cfg not in bwd_wide:
            continue
        for kernel in (AK._attn_bwd_dkdv_kernel, AK._attn_bwd_dq_kernel):
            fn = kernel.fn
            key = (str(cfg), fn.__name__, aligned)
            if key in done:
                out[done[key]][0] += " + " + name
                continue
            attrs = [n for n in fn.arg_names
                     if n in ("Q", "K", "V", "Mask", "DO", "Lse", "Delta", "DK", "DV", "DQ", "N", "M")]
            if aligned:
                attrs += [n for n in fn.arg_names if n.startswith("stride") and n != "stride_maskb"] + ["Dqk", "Dv"]
            types = {n: "*bf16" for n in ("Q", "K", "V", "DO", "DK", "DV", "DQ")}
            types.update({"Mask": "*u8", "Lse": "*fp32", "Delta": "*fp32", "seed": "i64", "scale": "fp32",
                          "scale_log2": "fp32", "dropout_p": "fp32"})
            consts = dict(HAS_MASK=False, DROPOUT=False, PRECISION="ieee", **cfg.kwargs)
            done[key] = len(out)
            build(kernel, types, consts, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                  f"{fn.__name__} bf16 {'aligned' if aligned else 'unaligned'} {cfg.kwargs} w{cfg.num_warps} "
                  f"s{cfg.num_stages}: {name}", attrs=attrs, usage=True, kind="wide-bwd")
cfg = AK._bwd_configs()[0]
for dt in ("fp16", "bf16"):
    types = {n: "*" + dt for n in ("Q", "K", "V", "DO", "DK", "DV", "DQ")}
    types.update({"Mask": "*u8", "Lse": "*fp32", "Delta": "*fp32", "seed": "i64", "scale": "fp32",
                  "scale_log2": "fp32", "dropout_p": "fp32"})
    consts = dict(HAS_MASK=True, DROPOUT=True, PRECISION="ieee", **cfg.kwargs)
    for kernel in (AK._attn_bwd_dkdv_kernel, AK._attn_bwd_dq_kernel):
        build(kernel, types, consts, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
              f"{kernel.fn.__name__} {dt}")
build(AK._attn_merge_kernel, {"Part": "*fp32", "PartLse": "*fp32", "Out": "*bf16", "Lse": "*fp32"},
      dict(BLOCK_N=64, BLOCK_DV=64), {"num_warps": 4}, "merge")
build(AK._attn_bwd_preprocess_kernel, {"Out": "*bf16", "DO": "*bf16", "Delta": "*fp32"},
      dict(BLOCK_N=64, BLOCK_DV=64), {"num_warps": 4}, "preprocess")
print("RESULT " + json.dumps(out))
"""


def _can_compile_for_cuda() -> bool:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401

        return "nvidia" in triton.backends.backends
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _can_compile_for_cuda(), reason="triton has no NVIDIA backend to compile with")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas available to this triton")
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    assert len(results) >= 10
    print(f"\n{'shared B':>9} {'regs':>5} {'spill B':>7}  kernel, config, shapes")
    for label, shared, regs, spills, _ in results:
        print(f"{shared:>9} {regs if regs is not None else '-':>5} {spills if spills is not None else '-':>7}  {label}")
    for label, shared, regs, spills, kind in results:
        assert shared <= SMEM_LIMIT, f"{label}: {shared} bytes of shared memory"
    wide = [r for r in results if r[4] == "wide"]
    assert len(wide) >= 4, wide
    bwd_wide = [r for r in results if r[4] == "wide-bwd"]
    assert len(bwd_wide) >= 8, bwd_wide  # 2 kernels x aligned/unaligned, at least 2 configs
    for label, shared, regs, spills, _ in wide + bwd_wide:
        assert regs is not None, f"{label}: no ptxas -v register count"
        assert spills == 0, f"{label}: {spills} bytes of register spills (stores + loads), {regs} registers"
