"""pytest-benchmark front end over the model cases of perceiver_fast.bench.shapes.

    pytest benchmarks/bench_models.py --benchmark-only      # GPU, full sizes
    pytest benchmarks/bench_models.py --benchmark-disable   # each case once (CI, CPU, tiny configs)

The models are built by perceiver_fast.bench.models (the same builders as
``perceiver-fast bench``): HF transformers' Perceivers, timm's ViT-B/16 (where
importable), their patched versions and ours. A library that is missing is
skipped with the reason.
"""
import pytest
import torch

from perceiver_fast.bench import shapes as S
from perceiver_fast.bench.backends import torch_dtype
from perceiver_fast.bench.models import builder, impls_for

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = "bfloat16" if CUDA else "float32"

CASES = [(c.name, impl) for c in S.MODEL_CASES for impl in impls_for(c)]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case_name,impl", CASES)
def test_model(benchmark, case_name, impl, direction):
    case = S.model_case(case_name)
    if not CUDA:
        case = case.small()
    try:
        with torch.device(DEVICE):
            model, fwd = builder(case, impl)()
    except ImportError as e:
        pytest.skip(f"{impl}: {e}")
    model = model.to(device=DEVICE, dtype=torch_dtype(DTYPE))
    x = torch.randn(case.batch, case.channels, case.image_size, case.image_size, device=DEVICE,
                    dtype=torch_dtype(DTYPE))
    if direction == "fwd":
        model.eval()

        def run():
            with torch.no_grad():
                out = fwd(model, x)
            _sync()
            return out
    else:
        model.train()

        def run():
            model.zero_grad(set_to_none=True)
            out = fwd(model, x)
            out.float().sum().backward()
            _sync()
            return out
    run()
    benchmark.extra_info.update(batch=case.batch, image_size=case.image_size)
    out = benchmark(run)
    assert out.shape == (case.batch, case.num_classes)
