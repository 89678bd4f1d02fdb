"""Fourier-feature position encoder: fused op vs HF's eager construction.

    pytest benchmarks/bench_fourier.py --benchmark-only --benchmark-group-by=group
    pytest benchmarks/bench_fourier.py --benchmark-disable      # run each case once (CI)

"eager" is HF transformers' recipe (reference.fourier_encode_reference:
build_linear_positions + generate_fourier_features in float32, then torch.cat
onto the flattened inputs); "fused" is perceiver_fast.fourier_encode, which
writes the output once. On a GPU two bandwidth ceilings are timed for the
same number of output bytes: a device-to-device copy (which also reads them)
and a fill (write only). extra_info carries the
bytes written and the effective GB/s (bytes of the output / median time).
"""
import math

import pytest
import torch

from perceiver_fast import fourier_encode
from perceiver_fast.ops.reference import fourier_encode_reference

CUDA = torch.cuda.is_available()

# (name, batch, index_dims, num_bands, input channels)
CPU_CASES = [
    ("B2-32x32-K16", 2, (32, 32), 16, 3),
    ("B4-16x64x64-K8-video", 4, (4, 64, 64), 8, 3),
    ("B8-224x224-K64", 8, (224, 224), 64, 3),  # the CPU target: fused >= 3x eager
]
GPU_CASES = [("B32-224x224-K64", 32, (224, 224), 64, 3)]


def _impl(name):
    if name == "fused":
        return fourier_encode
    if name == "eager":
        return fourier_encode_reference
    raise ValueError(name)


def _bench(benchmark, group, fn, out_bytes, sync, rounds):
    benchmark.group = group
    benchmark.extra_info["bytes_written"] = out_bytes

    def run():
        out = fn()
        sync()
        return out

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median:
        # median, not mean: robust to the odd descheduled round on a shared machine
        benchmark.extra_info["GB/s"] = round(out_bytes / stats.stats.median / 1e9, 2)
        benchmark.extra_info["median_ms"] = round(stats.stats.median * 1e3, 3)


def _out_bytes(batch, index_dims, num_bands, cin, dtype):
    channels = cin + len(index_dims) * (1 + 2 * num_bands)
    return batch * math.prod(index_dims) * channels * torch.tensor([], dtype=dtype).element_size()


@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_fourier_cpu(benchmark, case, impl):
    name, batch, index_dims, num_bands, cin = case
    x = torch.randn(batch, *index_dims, cin)
    fn = _impl(impl)
    rounds = 5 if batch * math.prod(index_dims) >= 100_000 else 20
    _bench(
        benchmark, f"fourier cpu {name}", lambda: fn(x, num_bands),
        _out_bytes(batch, index_dims, num_bands, cin, x.dtype), lambda: None, rounds,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["eager", "fused", "copy", "fill"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_fourier_cuda(benchmark, case, impl, dtype):
    name, batch, index_dims, num_bands, cin = case
    x = torch.randn(batch, *index_dims, cin, device="cuda", dtype=dtype)
    nbytes = _out_bytes(batch, index_dims, num_bands, cin, dtype)
    if impl == "copy":  # device-to-device copy writing as many bytes (and reading as many)
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    elif impl == "fill":  # write-only ceiling: fill as many bytes
        dst = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
        fn = lambda: dst.fill_(1.0)  # noqa: E731
    else:
        op = _impl(impl)
        fn = lambda: op(x, num_bands)  # noqa: E731
    _bench(benchmark, f"fourier cuda {name} {dtype}", fn, nbytes, torch.cuda.synchronize, 20)
