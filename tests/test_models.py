"""Models: shapes, fused == eager, presets, convergence, save/load, torch.compile, autocast, bad configs."""
import io
import os

import pytest
import torch
from torch.nn import functional as F

from helpers import TINY, images
from perceiver_fast.models import Perceiver, PerceiverIO, ViT

@pytest.mark.parametrize("name", sorted(TINY))
def test_fused_equals_eager_logits_and_grads(name):
    torch.manual_seed(0)
    fused = TINY[name](attention="fused").eval()
    eager = TINY[name](attention="eager").eval()
    eager.load_state_dict(fused.state_dict())
    x = images(name)
    a, b = fused(x), eager(x)
    assert a.shape == (2, 10)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (n, p), (_, q) in zip(fused.named_parameters(), eager.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_convergence_fused_matches_eager():
    """Same tiny Perceiver, same data, 4 Adam steps: fused and eager losses agree to 1e-4 (relative)."""
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    losses = {}
    init = TINY["perceiver"](attention="eager").state_dict()
    for attention in ("fused", "eager"):
        model = TINY["perceiver"](attention=attention)
        model.load_state_dict(init)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses[attention] = []
        for _ in range(4):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[attention].append(loss.item())
    assert losses["eager"][-1] < losses["eager"][0]  # it learns
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["eager"]), rtol=1e-4, atol=1e-5)


def test_presets_match_deepmind_vision_configs():
    with torch.device("meta"):
        models = {name: PerceiverIO.from_config(name) for name in ("learned", "fourier", "conv")}
    for model in models.values():
        assert model.latents.shape == (512, 1024)
        assert model.num_blocks == 8 and len(model.self_attends) == 6
        assert model.self_attends[0].heads == 8 and model.cross_attention.attn.heads == 1
        assert model.decoder.head.out_features == 1000
    assert models["learned"].preprocessor.num_channels == 512
    assert models["fourier"].preprocessor.num_channels == 261
    assert models["conv"].preprocessor.num_channels == 322
    assert models["conv"].preprocessor.num_inputs == 55 * 55
    # Projection folding is what the encoder uses at these shapes.
    for model in models.values():
        assert model.cross_attention.attn.use_folding(512, model.preprocessor.num_inputs)
    with pytest.raises(ValueError, match="unknown preset"):
        PerceiverIO.from_config("patches")


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: ViT(image_size=10, patch_size=4), "divisible by patch_size"),
        (lambda: ViT(dim=30, heads=4), "divisible by heads"),
        (lambda: ViT(pool="max"), "pool"),
        (lambda: Perceiver(latent_dim=30, self_heads=4), "divisible by heads"),
        (lambda: Perceiver(attention="sdpa"), "attention must be one of"),
        (lambda: PerceiverIO(latent_dim=30, self_heads=4, num_latents=2), "divisible by self_heads"),
        (lambda: PerceiverIO(latent_dim=32, cross_heads=3, num_latents=2), "cross_heads"),
        (lambda: PerceiverIO(image_size=8, preprocessing="pixels"), "preprocessing must be one of"),
        (lambda: PerceiverIO(image_size=3, preprocessing="conv"), "too small"),
    ],
)
def test_bad_model_configs(build, match):
    with pytest.raises(ValueError, match=match):
        build()


SMALL = dict(image_size=8, in_channels=1, num_classes=10)
SMALL_PIO = dict(SMALL, num_latents=4, latent_dim=16, num_blocks=1, num_self_attends_per_block=1, self_heads=2)


@pytest.mark.parametrize(
    "build, exc, match",
    [  # impossible configs are refused when built, naming the argument (were ZeroDivisionError, forward-time
       # errors, silent truncation or an empty model)
        (lambda: PerceiverIO(**dict(SMALL_PIO, self_heads=0)), ValueError, "self_heads must be >= 1, got 0"),
        (lambda: PerceiverIO(**dict(SMALL_PIO, cross_heads=0)), ValueError, "cross_heads must be >= 1"),
        (lambda: PerceiverIO(**dict(SMALL_PIO, decoder_heads=-1)), ValueError, "decoder_heads must be >= 1"),
        (lambda: PerceiverIO(**dict(SMALL_PIO, image_size=0)), ValueError, "image_size must be >= 1, got 0"),
        (lambda: PerceiverIO(**dict(SMALL_PIO, image_size=-8)), ValueError, "image_size must be >= 1, got -8"),
        (lambda: PerceiverIO(**dict(SMALL_PIO, image_size=8.7)), TypeError, "image_size must be an int, got 8.7"),
        (lambda: PerceiverIO(**dict(SMALL_PIO, image_size=(8, 0))), ValueError, r"image_size\[1\] must be >= 1"),
        (lambda: PerceiverIO(**dict(SMALL_PIO, preprocessing="fourier", num_bands=0)), ValueError,
         "num_bands must be >= 1, got 0"),
        (lambda: PerceiverIO(**dict(SMALL_PIO, num_classes=0)), ValueError, "num_classes must be >= 1"),
        (lambda: PerceiverIO(**dict(SMALL_PIO, dropout=1.0)), ValueError, "dropout must be a finite number"),
        (lambda: PerceiverIO(**dict(SMALL_PIO, in_channels=0)), ValueError, "in_channels must be >= 1"),
        (lambda: ViT(**SMALL, patch_size=2, dim=16, heads=2, depth=-1), ValueError, "depth must be >= 0, got -1"),
        (lambda: ViT(**SMALL, patch_size=2, dim=16, heads=0), ValueError, "heads must be >= 1, got 0"),
        (lambda: ViT(**dict(SMALL, image_size=8.7), patch_size=2, dim=16, heads=2), TypeError,
         "image_size must be an int"),
        (lambda: ViT(**SMALL, patch_size=0, dim=16, heads=2), ValueError, "patch_size must be >= 1"),
        (lambda: ViT(**SMALL, patch_size=2, dim=16, heads=2, mlp_ratio=0.01), ValueError,
         "mlp_ratio 0.01 gives an MLP of width"),
        (lambda: ViT(**SMALL, patch_size=2, dim=16, heads=2, mlp_ratio=float("nan")), ValueError,
         "mlp_ratio must be a finite number"),
        (lambda: ViT(**SMALL, patch_size=2, dim=16, heads=2, emb_dropout=-0.1), ValueError, "emb_dropout"),
        (lambda: Perceiver(**SMALL, num_latents=4, latent_dim=16, self_heads=2, depth=-1), ValueError,
         "depth must be >= 0"),
        (lambda: Perceiver(**SMALL, num_latents=4, latent_dim=16, self_heads=0), ValueError, "heads must be >= 1"),
        (lambda: Perceiver(**SMALL, num_latents=0, latent_dim=16, self_heads=2), ValueError,
         "num_latents must be >= 1"),
        (lambda: Perceiver(**SMALL, num_latents=4, latent_dim=16, self_heads=2, num_iterations=True), TypeError,
         "num_iterations must be an int"),
    ],
)
def test_impossible_configs_name_the_argument(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_models_save_and_load_pretrained_folders(tmp_path):
    """Hub-style round trip through local folders only: config.json holds the constructor's arguments."""
    import json

    for name in ("perceiver", "perceiver-io-fourier", "vit"):
        model = TINY[name](attention="eager").eval()
        folder = tmp_path / name
        model.save_pretrained(str(folder))
        assert {"config.json", "model.safetensors"} <= set(os.listdir(folder))
        config = json.load(open(folder / "config.json"))
        assert config["attention"] == "eager" and config["num_classes"] == 10
        loaded = type(model).from_pretrained(str(folder)).eval()
        x = images(name)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_mismatched_image_size_is_a_clear_error():
    model = TINY["vit"](attention="eager")
    with pytest.raises(ValueError, match=r"expected images of size \(8, 8\), got \(16, 16\)"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="expected 1 input channels, got 3"):
        TINY["perceiver-io-fourier"](attention="eager")(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("name", ["perceiver", "perceiver-io-learned"])
def test_state_dict_and_safetensors_round_trip(name, tmp_path):
    model = TINY[name](attention="fused").eval()
    x = images(name)
    want = model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = TINY[name](attention="eager").eval()
    other.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(other(x), want, rtol=1e-4, atol=1e-5)

    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_model(model, str(path))
    third = TINY[name](attention="fused").eval()
    safetensors_torch.load_model(third, str(path))
    torch.testing.assert_close(third(x), want)


@pytest.mark.parametrize("name", ["perceiver", "vit", "perceiver-io-fourier"])
def test_torch_compile_fullgraph(name):
    """torch.compile with fullgraph=True: no graph breaks anywhere, our custom ops included."""
    torch._dynamo.reset()
    model = TINY[name](attention="fused")
    x = images(name)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    out.sum().backward()  # the backward of the custom ops is traced too
    assert all(p.grad is not None for p in model.parameters())
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons


def test_autocast_eager_bf16():
    model = TINY["perceiver-io-fourier"](attention="eager").eval()
    x = images("perceiver-io-fourier")
    want = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=0.1, atol=0.05)


def test_autocast_fused_op_bf16_torch_backend(monkeypatch):
    """The fused custom ops under CPU autocast, via their PyTorch backend (bf16 tl.dot is broken in the
    Triton interpreter, so the Triton kernels themselves are only exercised in bf16 on a GPU)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # "auto" then picks the PyTorch backend
    model = TINY["perceiver"](attention="fused").eval()
    ref = TINY["perceiver"](attention="eager").eval()
    ref.load_state_dict(model.state_dict())
    x = images("perceiver")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        want = ref(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), rtol=0.05, atol=0.05)
