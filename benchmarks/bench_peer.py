"""pytest-benchmark front end over the peer cases of perceiver_fast.bench.peer: the community Perceiver
packages' main models, unpatched and patched by ``perceiver_fast.integrations.patch_model`` (same weights).

    pytest benchmarks/bench_peer.py --benchmark-only      # GPU, the packages' README sizes
    pytest benchmarks/bench_peer.py --benchmark-disable   # each case once (CI, CPU, small sizes)

The models are built by perceiver_fast.bench.peer (the same builders as ``perceiver-fast bench --peer``).
On a machine without CUDA they run at small sizes and the fused op runs its PyTorch path. Each patched
case also checks, once, that it matches the unpatched model (fp32: relative error <= 1e-5, outputs and
gradients) and that the fused op ran. A package that is not installed is skipped with the reason.
"""
import pytest
import torch

from perceiver_fast.bench.backends import torch_dtype
from perceiver_fast.bench.peer import PEER_CASES, PEER_TOLERANCE, build_pair, count_fused_calls, parity, peer_case

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = "bfloat16" if CUDA else "float32"


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["unpatched", "patched"])
@pytest.mark.parametrize("case_name", [c.name for c in PEER_CASES])
def test_peer(benchmark, case_name, impl, direction):
    case = peer_case(case_name)
    try:
        built, patched, n_modules = build_pair(case, not CUDA, DEVICE, torch_dtype(DTYPE))
    except ImportError as e:
        pytest.skip(str(e))
    inputs = built.inputs(DEVICE, torch_dtype(DTYPE))
    model = patched if impl == "patched" else built.model
    fused = count_fused_calls(lambda: built.forward(model.eval(), inputs))
    if impl == "patched":
        assert n_modules > 0 and fused > 0, (n_modules, fused)
        out_err, grad_err = parity(built.model, patched, built.forward, inputs, backward=direction != "fwd")
        tol = PEER_TOLERANCE[DTYPE]
        assert out_err <= tol and (grad_err is None or grad_err <= tol), (out_err, grad_err)
    else:
        assert fused == 0
    if direction == "fwd":
        model.eval()

        def run():
            with torch.no_grad():
                out = built.forward(model, inputs)
            _sync()
            return out
    else:
        model.train()

        def run():
            model.zero_grad(set_to_none=True)
            out = built.forward(model, inputs)
            out.float().sum().backward()
            _sync()
            return out
    run()
    benchmark.extra_info.update(package=case.package, model=case.model, fused_calls=fused)
    out = benchmark(run)
    assert torch.isfinite(out.float()).all()
