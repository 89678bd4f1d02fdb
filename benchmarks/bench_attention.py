"""pytest-benchmark front end over the attention shapes of perceiver_fast.bench.shapes.

    pytest benchmarks/bench_attention.py --benchmark-only            # time (GPU: full sizes)
    pytest benchmarks/bench_attention.py --benchmark-disable         # run each case once (CI, CPU)
    pytest benchmarks/bench_attention.py -k "pio_learned and fused"

Shapes, inputs and backends are the ones ``perceiver-fast bench`` uses (one
source: perceiver_fast/bench/shapes.py and backends.py). On a machine without
CUDA the shapes are shrunk with ``shape.small()`` and the fused ops run their
PyTorch fallback (the Triton kernels need a GPU). A backend that refuses a
shape (SDPA flash/cuDNN with head dim 512, ...) is skipped with the reason.
"""
import pytest
import torch

from perceiver_fast.bench import shapes as S
from perceiver_fast.bench.backends import SDPA_BACKENDS, attn_backend, attn_grad_leaves, attn_inputs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = "bfloat16" if CUDA else "float32"
BACKENDS = ["eager"] + SDPA_BACKENDS + ["fused"]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _case(shape_name, backend, backward):
    shape = S.attn_shape(shape_name)
    if not CUDA:
        shape = shape.small()
    inp = attn_inputs(shape, DTYPE, DEVICE, requires_grad=backward)
    fn = attn_backend(backend, shape)
    if backward:
        leaves = attn_grad_leaves(backend, inp)

        def run():
            out = fn(inp)
            grads = torch.autograd.grad(out, leaves, inp["d_out"])
            _sync()
            return grads
    else:
        def run():
            with torch.no_grad():
                out = fn(inp)
            _sync()
            return out
    try:
        run()  # warm-up: compiles/autotunes, and tells whether the backend accepts the shape
    except RuntimeError as e:
        if backend.startswith("sdpa"):
            pytest.skip(f"{backend} refuses {shape.label()}: {str(e).splitlines()[0][:120]}")
        raise
    return shape, run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape_name", [s.name for s in S.ATTN_SHAPES])
def test_attention_forward(benchmark, shape_name, backend):
    shape, run = _case(shape_name, backend, backward=False)
    benchmark.extra_info.update(label=shape.label(), flops=shape.flops(), bytes=shape.bytes(DTYPE),
                                floor_ms=shape.floor_ms(DTYPE))
    out = benchmark(run)
    assert out.shape == (shape.B, shape.N, shape.H, shape.Dv)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape_name", [s.name for s in S.ATTN_SHAPES])
def test_attention_forward_backward(benchmark, shape_name, backend):
    shape, run = _case(shape_name, backend, backward=True)
    benchmark.extra_info.update(label=shape.label(), flops=shape.flops(True), bytes=shape.bytes(DTYPE, True),
                                floor_ms=shape.floor_ms(DTYPE, True))
    grads = benchmark(run)
    assert len(grads) == 3
