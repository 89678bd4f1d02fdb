"""Fourier-feature position encoder: the fused C++/CUDA op against the float64
oracle (reference.py), against HF transformers, and its error handling."""
import math

import pytest
import torch

from helpers import HAS_CUDA, requires_cuda
from perceiver_fast import FourierPositionEncoding, fourier_encode, fourier_features
from perceiver_fast import _extension
from perceiver_fast.ops.fourier import fourier_channels
from perceiver_fast.ops.reference import fourier_encode_reference, fourier_features_reference

OP = torch.ops.perceiver_fast.fourier_encode

try:
    from transformers.models.perceiver.modeling_perceiver import build_linear_positions, generate_fourier_features
except Exception:  # pragma: no cover - transformers not installed
    generate_fourier_features = None

needs_hf = pytest.mark.skipif(generate_fourier_features is None, reason="transformers is not installed")

# Max |error| of a float32 result against float64: half an ulp of values in
# [-1, 1] (2^-25) for sin/cos, and torch.linspace's own float32 rounding of the
# positions (a few ulp); 2e-7 covers both with margin.
F32_ATOL = 2e-7
# 16-bit outputs: rounding once (via float32) is within one unit of the dtype's eps.
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

CASES = [
    # index_dims, num_bands, max_resolution
    ((7,), 1, None),
    ((1,), 3, None),
    ((33,), 8, (100.0,)),
    ((5, 8), 4, None),
    ((13, 11), 16, None),
    ((1, 9), 2, None),
    ((32, 24), 64, (224.0, 224.0)),
    ((4, 6, 5), 6, None),  # video: (time, height, width)
    ((3, 16, 16), 8, (16.0, 224.0, 224.0)),
]
FLAGS = [(True, False), (False, False), (True, True), (False, True)]


def _ref64(index_dims, num_bands, max_resolution=None, concat_pos=True, sine_only=False):
    return fourier_features_reference(
        index_dims, num_bands, max_resolution=max_resolution, concat_pos=concat_pos, sine_only=sine_only,
        dtype=torch.float64,
    )


def _hf_features(index_dims, num_bands, max_resolution, concat_pos, sine_only):
    pos = build_linear_positions(index_dims).reshape(1, -1, len(index_dims))
    out = generate_fourier_features(
        pos, num_bands, max_resolution=max_resolution, concat_pos=concat_pos, sine_only=sine_only
    )
    return out.reshape(-1, out.shape[-1])


@pytest.mark.parametrize("index_dims,num_bands,max_resolution", CASES)
@pytest.mark.parametrize("concat_pos,sine_only", FLAGS)
def test_features_match_float64_formula(index_dims, num_bands, max_resolution, concat_pos, sine_only):
    out = fourier_features(
        index_dims, num_bands, max_resolution=max_resolution, concat_pos=concat_pos, sine_only=sine_only
    )
    ref = _ref64(index_dims, num_bands, max_resolution, concat_pos, sine_only)
    assert out.dtype == torch.float32
    assert out.shape == (math.prod(index_dims), fourier_channels(len(index_dims), num_bands, concat_pos, sine_only))
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=F32_ATOL, rtol=0)
    if concat_pos:  # positions are torch.linspace's float32 values, bit for bit (as in HF)
        ref32 = fourier_features_reference(index_dims, num_bands, max_resolution=max_resolution)
        D = len(index_dims)
        assert torch.equal(out[:, :D], ref32[:, :D])


@needs_hf
@pytest.mark.parametrize("index_dims,num_bands,max_resolution", CASES + [((224, 224), 64, None)])
@pytest.mark.parametrize("concat_pos,sine_only", FLAGS)
def test_features_match_transformers(index_dims, num_bands, max_resolution, concat_pos, sine_only):
    res = tuple(max_resolution or index_dims)
    hf = _hf_features(index_dims, num_bands, res, concat_pos, sine_only)
    out = fourier_features(index_dims, num_bands, max_resolution=res, concat_pos=concat_pos, sine_only=sine_only)
    assert out.shape == hf.shape
    # HF rounds the argument pi * f * x in float32 (x * f, then * pi, ~3 roundings
    # of 2^-24 relative each) before sin/cos; its own error is up to
    # 3 * 2^-24 * pi * max f (= max_res / 2), e.g. 3e-5 at 224 px. Ours is <= 2e-7.
    atol = 3 * 2.0**-24 * math.pi * max(res) / 2 + 2 * F32_ATOL
    torch.testing.assert_close(out, hf, atol=atol, rtol=0)
    if concat_pos:
        D = len(index_dims)
        assert torch.equal(out[:, :D], hf[:, :D])


def test_sin_cos_correctly_rounded_at_224_px():
    # Arguments reach pi * 112: float64 sin/cos rounded once are within half an
    # ulp (2^-25 for |v| < 1); HF's float32 arguments are off by up to ~3e-5.
    out = fourier_features((224, 224), 64)
    err = (out[:, 2:].double() - _ref64((224, 224), 64)[:, 2:]).abs().max().item()
    assert err <= 2.0**-24, err


def test_channel_order_by_hand():
    # 2-D, K=2, max_resolution (4, 6): f_0 = (1, 1), f_1 = (2, 3).
    out = fourier_features((3, 2), 2, max_resolution=(4, 6)).double()
    assert out.shape == (6, 2 + 2 * 2 * 2)
    p = 1 * 2 + 0  # i = 1 along axis 0 (x = 0), j = 0 along axis 1 (y = -1)
    x, y = 0.0, -1.0
    expected = [x, y]
    expected += [math.sin(math.pi * x * 1), math.sin(math.pi * x * 2)]
    expected += [math.sin(math.pi * y * 1), math.sin(math.pi * y * 3)]
    expected += [math.cos(math.pi * x * 1), math.cos(math.pi * x * 2)]
    expected += [math.cos(math.pi * y * 1), math.cos(math.pi * y * 3)]
    torch.testing.assert_close(out[p], torch.tensor(expected, dtype=torch.float64), atol=F32_ATOL, rtol=0)
    out = fourier_features((3, 2), 2, max_resolution=(4, 6), concat_pos=False, sine_only=True).double()
    torch.testing.assert_close(out[p], torch.tensor(expected[2:6], dtype=torch.float64), atol=F32_ATOL, rtol=0)


def _check_encode(out, inputs, num_bands, max_resolution=None, concat_pos=True, sine_only=False, atol=F32_ATOL):
    B, Cin = inputs.shape[0], inputs.shape[-1]
    index_dims = tuple(inputs.shape[1:-1])
    P = math.prod(index_dims)
    C = fourier_channels(len(index_dims), num_bands, concat_pos, sine_only)
    assert out.shape == (B, P, Cin + C) and out.dtype == inputs.dtype and out.is_contiguous()
    assert torch.equal(out[..., :Cin], inputs.reshape(B, P, Cin))
    ref = _ref64(index_dims, num_bands, max_resolution, concat_pos, sine_only).to(out.device)
    # Every element of every batch row is compared: no uninitialised memory.
    torch.testing.assert_close(out[..., Cin:].double(), ref.expand(B, -1, -1), atol=atol, rtol=0)


@pytest.mark.parametrize(
    "shape,num_bands,max_resolution",
    [
        ((2, 9, 3), 5, None),
        ((3, 5, 7, 4), 3, (10.0, 20.0)),
        ((3, 37, 29, 5), 64, None),  # several parallel chunks and staging blocks
        ((1, 2, 3, 4, 2), 2, None),
        ((2, 6, 0), 4, None),  # no input channels: just the features
    ],
)
@pytest.mark.parametrize("concat_pos,sine_only", FLAGS)
def test_encode_float32(shape, num_bands, max_resolution, concat_pos, sine_only):
    x = torch.randn(shape)
    out = fourier_encode(x, num_bands, max_resolution=max_resolution, concat_pos=concat_pos, sine_only=sine_only)
    _check_encode(out, x, num_bands, max_resolution, concat_pos, sine_only)


def test_encode_matches_eager_reference_large():
    # 8 x 64 x 64 x 3 with 64 bands: 34 MB, the huge-page output path.
    x = torch.randn(8, 64, 64, 3)
    out = fourier_encode(x, 64)
    _check_encode(out, x, 64)
    # and HF's eager recipe (float32 arguments: see test_features_match_transformers)
    torch.testing.assert_close(out, fourier_encode_reference(x, 64), atol=3 * 2.0**-24 * math.pi * 32 + 4e-7, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_encode_16bit(dtype):
    x = torch.randn(3, 7, 9, 3).to(dtype)
    for concat_pos, sine_only in FLAGS:
        out = fourier_encode(x, 8, concat_pos=concat_pos, sine_only=sine_only)
        _check_encode(out, x, 8, None, concat_pos, sine_only, atol=EPS[dtype])


def test_encode_float64():
    x = torch.randn(2, 5, 6, 2, dtype=torch.float64)
    out = fourier_encode(x, 7)
    _check_encode(out, x, 7, atol=1e-12)
    assert torch.equal(out[0, :, 2:4], fourier_features_reference((5, 6), 7, dtype=torch.float64)[:, :2])


def test_non_contiguous_and_empty_batch():
    x = torch.randn(4, 3, 5, 6).permute(0, 2, 3, 1)  # (4, 5, 6, 3), channels-last view
    assert not x.is_contiguous()
    _check_encode(fourier_encode(x, 4), x, 4)
    out = fourier_encode(torch.randn(0, 5, 6, 3), 4)
    assert out.shape == (0, 30, 3 + fourier_channels(2, 4))


def test_gradients():
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fourier_encode(t, 3), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fourier_encode(t, 3), (x,))
    x32 = torch.randn(2, 4, 3, 5, requires_grad=True)
    g = torch.randn(2, 12, 5 + fourier_channels(2, 3))
    fourier_encode(x32, 3).backward(g)
    assert torch.equal(x32.grad, g[..., :5].reshape(2, 4, 3, 5))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    x = torch.randn(2, 20, 3, requires_grad=requires_grad)
    torch.library.opcheck(OP.default, (x, [4, 5], [8.0, 10.0], 3, True, False))
    torch.library.opcheck(OP.default, (x, [20], [], 1, False, True))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def f(t):
        return fourier_encode(t * 2.0, 4, concat_pos=True).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend=backend, dynamic=True)
    for batch in (2, 3):  # dynamic batch size
        x = torch.randn(batch, 6, 5, 3, requires_grad=True)
        y = compiled(x)
        torch.testing.assert_close(y, f(x))
        y.sum().backward()
        torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    pe = FourierPositionEncoding((6, 5), 4)
    x = torch.randn(2, 6, 5, 3)
    torch.testing.assert_close(torch.compile(pe, fullgraph=True, backend=backend)(x), pe(x))


# ---------------------------------------------------------------- bad input
BAD_FEATURES = [
    (dict(index_dims=(8, 8), num_bands=0), ValueError, "num_bands must be >= 1"),
    (dict(index_dims=(8, 8), num_bands=-3), ValueError, "num_bands must be >= 1"),
    (dict(index_dims=(8, 8), num_bands=2.5), TypeError, "num_bands must be an int"),
    (dict(index_dims=(), num_bands=4), ValueError, "index_dims must be a non-empty"),
    (dict(index_dims=(8, 0), num_bands=4), ValueError, "positive"),
    (dict(index_dims=(8, -2), num_bands=4), ValueError, "positive"),
    (dict(index_dims=(8, 2.5), num_bands=4), TypeError, "index_dims must be a sequence of ints"),
    (dict(index_dims=8, num_bands=4), TypeError, "index_dims must be a sequence of ints"),
    (dict(index_dims=(2,) * 9, num_bands=4), ValueError, "at most 8"),
    (dict(index_dims=(8, 8), num_bands=4, max_resolution=(8,)), ValueError, "max_resolution has 1 entries"),
    (dict(index_dims=(8,), num_bands=4, max_resolution=(float("nan"),)), ValueError, "finite"),
    (dict(index_dims=(8,), num_bands=4, max_resolution="8"), TypeError, "max_resolution must be a sequence"),
    (dict(index_dims=(8,), num_bands=4, dtype=torch.int32), TypeError, "dtype torch.int32"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_FEATURES)
def test_bad_arguments(kwargs, exc, match):
    kwargs = dict(kwargs)
    with pytest.raises(exc, match=match):
        fourier_features(kwargs.pop("index_dims"), kwargs.pop("num_bands"), **kwargs)


def test_bad_inputs():
    with pytest.raises(TypeError, match="dtype torch.int64"):
        fourier_encode(torch.zeros(2, 4, 4, 3, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fourier_encode([[1.0]], 4)
    with pytest.raises(ValueError, match="channels-last"):
        fourier_encode(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="max_resolution has 1 entries"):
        fourier_encode(torch.zeros(2, 4, 4, 3), 4, max_resolution=(4,))
    with pytest.raises(ValueError, match="num_bands must be >= 1"):
        fourier_encode(torch.zeros(2, 4, 4, 3), 0)
    with pytest.raises(ValueError, match=r"inputs of shape \(2, 0, 4, 3\) have an empty index dim"):
        fourier_encode(torch.zeros(2, 0, 4, 3), 4)
    pe = FourierPositionEncoding((4, 4), 2)
    with pytest.raises(ValueError, match=r"do not match index_dims \(4, 4\)"):
        pe(torch.zeros(2, 4, 5, 3))
    with pytest.raises(ValueError, match="do not match index_dims"):
        pe(torch.zeros(2, 15, 3))


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(2, 12, 3), [3, 5], [], 4, True, False), "prod\\(index_dims"),
        ((torch.zeros(2, 12, 3), [3, 4], [], 0, True, False), "num_bands must be >= 1"),
        ((torch.zeros(2, 12, 3), [], [], 4, True, False), "index_dims must have 1 to 8"),
        ((torch.zeros(2, 12, 3), [-3, -4], [], 4, True, False), "index_dims must be positive"),
        ((torch.zeros(2, 12, 3), [3, 4], [1.0], 4, True, False), "max_resolution has 1 entries"),
        ((torch.zeros(12, 3), [3, 4], [], 4, True, False), "must be 3-D"),
        ((torch.zeros(2, 12, 3, dtype=torch.int32), [3, 4], [], 4, True, False), "floating-point"),
        ((torch.zeros(2, 1, 3), [2**40, 2**40], [], 4, True, False), "overflows"),
    ],
)
def test_op_validates_without_python_checks(args, match):
    with pytest.raises(RuntimeError, match=match):
        OP(*args)


@pytest.mark.skipif(HAS_CUDA and _extension.cuda_available(), reason="CUDA kernels are built here")
def test_cuda_without_kernels_says_how_to_build(monkeypatch):
    with pytest.raises(RuntimeError, match="no CUDA kernels.*pip install --no-build-isolation -e ."):
        _extension.check_device("fourier_encode", torch.device("cuda"))


@pytest.mark.skipif(HAS_CUDA and _extension.cuda_available(), reason="CUDA kernels are built here")
def test_cuda_features_without_kernels_says_how_to_build():
    # was torch's "Torch not compiled with CUDA enabled" AssertionError on a CPU-only torch
    with pytest.raises(RuntimeError, match="no CUDA kernels.*pip install --no-build-isolation -e ."):
        fourier_features((4, 4), 2, device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        FourierPositionEncoding((4, 4), 2).features(device="cuda")


def test_missing_extension_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "perceiver_fast" and fromlist and "_C" in fromlist:
            raise ImportError("No module named 'perceiver_fast._C'")
        return real_import(name, globals, locals, fromlist, level)

    _extension.load.cache_clear()
    monkeypatch.setattr(builtins, "__import__", fake_import)
    try:
        with pytest.raises(ImportError, match="C\\+\\+ extension is not built: run `pip install --no-build-isolation"):
            _extension.load()
    finally:
        monkeypatch.undo()
        _extension.load.cache_clear()
        _extension.load()


def test_extension_imports_before_torch():
    import subprocess
    import sys

    code = "import perceiver_fast._C, torch; print(torch.ops.perceiver_fast.fourier_encode.default)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


# ---------------------------------------------------------------- module
def test_module_forward_and_cache():
    pe = FourierPositionEncoding((6, 5), 4, max_resolution=(12, 10))
    assert pe.output_channels == pe.output_size() == 2 + 2 * 2 * 4
    assert pe.num_dimensions == 2
    x = torch.randn(3, 6, 5, 7)
    out = pe(x)
    assert torch.equal(out, fourier_encode(x, 4, max_resolution=(12, 10)))
    assert torch.equal(pe(x.reshape(3, 30, 7)), out)
    f32 = pe.features()
    assert f32 is pe.features(device="cpu", dtype=torch.float32)  # cached
    assert torch.equal(f32, out[0, :, 7:])
    f16 = pe.features(dtype=torch.float16)
    assert f16.dtype == torch.float16 and f16 is not f32
    assert pe.features(4).shape == (4, 30, pe.output_channels)
    assert "num_bands=4" in repr(pe)
    assert len(pe.state_dict()) == 0  # the cache is not a buffer: nothing to save or load


@needs_hf
def test_module_matches_hf_position_encoding():
    from transformers.models.perceiver.modeling_perceiver import PerceiverFourierPositionEncoding

    hf = PerceiverFourierPositionEncoding(num_bands=16, max_resolution=(24, 32))
    ours = FourierPositionEncoding((24, 32), 16)
    assert ours.output_size() == hf.output_size()
    expected = hf((24, 32), 2, torch.device("cpu"), torch.float32)
    atol = 3 * 2.0**-24 * math.pi * 16 + 2 * F32_ATOL
    torch.testing.assert_close(ours.features(2), expected, atol=atol, rtol=0)


# ---------------------------------------------------------------- CUDA
CUDA_CASES = [
    ((2, 9, 3), 5, None),
    ((3, 37, 29, 5), 64, None),
    ((2, 224, 224, 3), 64, None),
    ((1, 4, 6, 5, 1), 6, (8.0, 16.0, 16.0)),
    ((2, 7, 0), 3, None),
    ((2, 17, 13, 9), 1, None),
    ((1, 1, 2), 3, None),  # B = P = 1
    ((7, 160, 140, 1), 4, None),  # fp32: 700 position blocks x 3 batch chunks of 3, 3 and 1 (uneven last)
]


@requires_cuda
@pytest.mark.parametrize("shape,num_bands,max_resolution", CUDA_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("concat_pos,sine_only", FLAGS)
def test_cuda_matches_cpu(shape, num_bands, max_resolution, dtype, concat_pos, sine_only):
    x = torch.randn(shape).to(dtype)
    kw = dict(max_resolution=max_resolution, concat_pos=concat_pos, sine_only=sine_only)
    cpu = fourier_encode(x, num_bands, **kw)
    gpu = fourier_encode(x.cuda(), num_bands, **kw)
    assert gpu.shape == cpu.shape and gpu.dtype == dtype and gpu.is_cuda
    # Both round float64 sin/cos once; positions may differ by torch.linspace's
    # CPU-vs-CUDA float32 rounding (an ulp or two).
    atol = {torch.float32: 2.5e-7, torch.float64: 1e-12}.get(dtype, EPS.get(dtype))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=atol, rtol=0)
    Cin = shape[-1]
    if dtype in (torch.float32, torch.float64):
        _check_encode(gpu, x.cuda(), num_bands, max_resolution, concat_pos, sine_only, atol=atol)
    assert torch.equal(gpu[..., :Cin].cpu(), cpu[..., :Cin])


@requires_cuda
def test_cuda_sin_error_at_224_px():
    out = fourier_features((224, 224), 64, device="cuda").cpu()
    ref = _ref64((224, 224), 64)
    err = (out[:, 2:].double() - ref[:, 2:]).abs().max().item()
    print(f"CUDA fp32 sin/cos max |error| vs float64 at 224x224, 64 bands: {err:.3g}")
    assert err <= 2.0**-24  # correctly rounded float64 sin/cos: <= half an ulp of 1
    # positions: torch.linspace on the GPU, as HF builds them there
    lin = torch.linspace(-1, 1, 224, device="cuda").cpu()
    grid = torch.stack(torch.meshgrid(lin, lin, indexing="ij"), -1).reshape(-1, 2)
    torch.testing.assert_close(out[:, :2], grid, atol=2.5e-7, rtol=0)
    print("positions bitwise equal to CUDA torch.linspace:", torch.equal(out[:, :2], grid))


@requires_cuda
def test_cuda_gradients_opcheck_and_offset_storage():
    x = torch.randn(2, 5, 4, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fourier_encode(t, 2), (x,))
    torch.library.opcheck(OP.default, (torch.randn(2, 20, 3, device="cuda"), [4, 5], [], 3, True, False))
    # Output and input at odd element offsets (vector-store head/tail paths).
    base = torch.randn(1 + 2 * 11 * 3, device="cuda", dtype=torch.float16)
    x = base[1:].view(2, 11, 3)
    _check_encode(fourier_encode(x, 5), x, 5, atol=EPS[torch.float16])
    with torch.cuda.device(0):
        pe = FourierPositionEncoding((11,), 5)
        assert torch.equal(pe.features(device="cuda"), pe(x.new_zeros(1, 11, 0).float())[0])


@requires_cuda
def test_cuda_output_over_2_31_elements():
    # 64-bit offsets: rows past element 2**31 of the output are written where they belong
    P, C = 224 * 224, 2 + 2 * 2 * 64
    B = 2**31 // (P * C) + 1
    need = B * P * C * 2
    if torch.cuda.mem_get_info()[0] < 1.5 * need:
        pytest.skip(f"needs {1.5 * need / 2**30:.1f} GiB of free GPU memory")
    out = fourier_encode(torch.empty(B, 224, 224, 0, device="cuda", dtype=torch.float16), 64)
    assert out.numel() > 2**31 and out.shape == (B, P, C)
    feats = fourier_features((224, 224), 64, dtype=torch.float16, device="cuda")
    for b in (0, B // 2, B - 1):
        assert torch.equal(out[b], feats), b


def test_without_the_extension_the_ops_fall_back_to_the_eager_formula(monkeypatch):
    """One route to the encoder: ops.fourier itself falls back (was a second, layer-side route)."""
    from perceiver_fast.layers.preprocessors import ImagePreprocessor
    from perceiver_fast.ops import fourier as fourier_module

    x = torch.randn(2, 3, 4, 2)
    fused = fourier_encode(x, 3)
    monkeypatch.setattr(fourier_module, "_LOAD_ERROR", ImportError("not built"))
    assert not fourier_module.fused_available()
    torch.testing.assert_close(fourier_encode(x, 3), fused)
    torch.testing.assert_close(fourier_features((3, 4), 3), fourier_features_reference((3, 4), 3))
    prep = ImagePreprocessor("fourier", image_size=(3, 4), in_channels=2, num_bands=3)
    torch.testing.assert_close(prep(x.permute(0, 3, 1, 2)), fused)
