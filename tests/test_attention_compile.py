"""Ahead-of-time compilation of the attention kernels for an sm_90 target.

The interpreter runs the kernels' semantics on CPU but never lowers them, so a
kernel that only fails in the GPU compiler (types of loop-carried values,
dot shapes, shared memory beyond the H200's 232,448 bytes) would go unnoticed
on a machine without a GPU. This test compiles every forward config and one
backward config per kernel to a cubin with triton's bundled ptxas, in a
subprocess without TRITON_INTERPRET (which would replace @triton.jit).
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
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from perceiver_fast.ops import attention_kernels as AK

target = GPUTarget("cuda", 90, 32)
out = []

def build(kernel, types, consts, cfg_opts, label):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig,
                                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=target, options=cfg_opts)
    out.append([label, compiled.metadata.shared])

for dt, prec, cfgs in (("fp16", "ieee", AK._fwd_configs()), ("fp32", "tf32", AK._fwd_configs()[:1]),
                       ("fp32", "ieee", AK._fwd_configs()[:1])):
    for cfg in cfgs:
        types = {"Q": "*" + dt, "K": "*" + dt, "V": "*" + dt, "Mask": "*u8", "Out": "*fp32", "Lse": "*fp32",
                 "seed": "i64", "scale_log2": "fp32", "dropout_p": "fp32"}
        consts = dict(HAS_MASK=True, DROPOUT=True, SPLIT=True, PRECISION=prec, **cfg.kwargs)
        build(AK._attn_fwd_kernel, types, consts, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
              f"fwd {dt} {prec} {cfg.kwargs}")
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
    for label, shared in results:
        assert shared <= SMEM_LIMIT, f"{label}: {shared} bytes of shared memory"
