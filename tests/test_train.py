"""perceiver-fast train, in-process on tiny sizes: data loading and checks,
augmentation, the loss falls, the checkpoint reloads, DDP under torchrun."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from perceiver_fast.cli import UsageError
from perceiver_fast.train import TrainConfig, augment, build_model, load_arrays, make_dataset, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_split_is_fixed_and_normalised():
    a = make_dataset("digits", seed=0)
    b = make_dataset("digits", seed=0)
    assert a.image_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.x_train) + len(a.x_test) == 1797 and len(a.x_test) == 359
    assert torch.equal(a.y_test, b.y_test)
    assert abs(a.x_train.mean().item()) < 1e-3 and abs(a.x_train.std().item() - 1) < 1e-2


def test_npz_checks(tmp_path):
    ok = tmp_path / "ok.npz"
    np.savez(ok, x=np.random.randint(0, 255, (30, 6, 6, 3), dtype=np.uint8), y=np.arange(30) % 3)
    x, y, name = load_arrays(str(ok))
    assert x.shape == (30, 6, 6, 3) and y.dtype == np.int64 and name == "ok.npz"
    cases = {
        "float": (dict(x=np.zeros((30, 6, 6, 3), np.float32), y=np.zeros(30, int)), "uint8"),
        "ymismatch": (dict(x=np.zeros((30, 6, 6, 3), np.uint8), y=np.zeros(29, int)), "y must be N integer"),
        "yfloat": (dict(x=np.zeros((30, 6, 6, 3), np.uint8), y=np.zeros(30, np.float32)), "y must be N integer"),
        "few": (dict(x=np.zeros((5, 6, 6, 3), np.uint8), y=np.zeros(5, int)), "at least 10"),
    }
    for name, (arrays, msg) in cases.items():
        p = tmp_path / f"{name}.npz"
        np.savez(p, **arrays)
        with pytest.raises(UsageError, match=msg):
            load_arrays(str(p))
    notzip = tmp_path / "broken.npz"
    notzip.write_bytes(b"not a zip file")
    with pytest.raises(UsageError, match="cannot read"):
        load_arrays(str(notzip))


def test_augment_shifts_within_bounds():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    y = augment(x, 1, g)
    assert y.shape == x.shape
    assert torch.equal(augment(x, 0, g), x)
    for i in range(2):  # every output pixel is 0 (padding) or an input pixel of the same image
        assert set(y[i].flatten().tolist()) <= set(x[i].flatten().tolist()) | {0.0}


@pytest.mark.parametrize("model", ["perceiver", "perceiver-io", "vit"])
def test_tiny_training_loss_falls_and_checkpoint_reloads(tmp_path, model):
    from safetensors.torch import load_file

    cfg = TrainConfig(model=model, size="tiny", attention="eager", epochs=10, limit=80, batch_size=16, lr=1e-2,
                      shift=0, out=str(tmp_path), quiet=True)
    m = train(cfg)
    losses = m["step_losses"]
    assert len(losses) == 10 * 4  # 64 training images, batch 16
    # epoch means (64 images each) of the training loss: the last is clearly below the first
    first, last = m["history"][0]["train_loss"], m["history"][-1]["train_loss"]
    assert last < first * 0.97, [h["train_loss"] for h in m["history"]]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    for name in ("model.safetensors", "config.json", "metrics.json", "training.png"):
        assert (tmp_path / name).is_file()
    conf = json.load(open(tmp_path / "config.json"))
    net, _ = build_model(conf["model"], conf["image_shape"], conf["num_classes"], "eager", "tiny")
    net.load_state_dict(load_file(str(tmp_path / "model.safetensors")))


def test_unknown_model_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown model"):
        build_model("resnet", (1, 8, 8), 10, "eager")


def test_ddp_under_torchrun_two_cpu_processes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "perceiver_fast", "train", "--model", "vit", "--size", "tiny", "--epochs", "2", "--limit", "120",
           "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "DDP world 2" in p.stdout
    m = json.load(open(tmp_path / "metrics.json"))
    assert m["world_size"] == 2
    # 96 training images, 2 ranks, batch 16: 3 steps per rank per epoch
    assert m["history"][-1]["step"] == 6


@pytest.mark.parametrize("shape", [(20, 8, 8, 0), (20, 0, 8, 1), (20, 8, 0, 1)])
def test_npz_with_an_empty_image_axis_is_refused(tmp_path, shape):
    p = tmp_path / "empty.npz"
    np.savez(p, x=np.zeros(shape, np.uint8), y=np.arange(20) % 2)
    with pytest.raises(UsageError, match=r"H, W, C >= 1.*\(20, "):
        load_arrays(str(p))


def test_model_that_cannot_be_built_is_a_usage_error():
    # 10**12 classes: the classifier cannot be allocated (was a RuntimeError traceback)
    with pytest.raises(UsageError, match="cannot build vit .* 1000000000000 classes"):
        build_model("vit", (1, 8, 8), 10**12, "eager", "tiny")


@pytest.mark.parametrize("hw, preset, expected", [
    ((8, 8), 2, 2),        # digits: the preset
    ((224, 224), 2, 14),   # 16 x 16 = 256 patches, not 12,544
    ((9, 9), 2, 3),        # 2 does not tile 9: the next divisor
    ((7, 11), 2, 1),       # no common divisor but 1
])
def test_patch_size_scales_with_the_image(hw, preset, expected):
    from perceiver_fast.train import MAX_PATCH_TOKENS, PRESETS, patch_size_for

    p = patch_size_for(*hw, preset)
    assert p == expected
    assert hw[0] % p == 0 and hw[1] % p == 0
    if expected > 1:
        assert (hw[0] // p) * (hw[1] // p) <= MAX_PATCH_TOKENS
    net, kw = build_model("vit", (3, *hw), 10, "eager", "tiny")
    assert kw["patch_size"] == patch_size_for(*hw, PRESETS["vit"]["tiny"]["patch_size"])
