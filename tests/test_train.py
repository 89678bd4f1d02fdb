"""perceiver-fast train, in-process on tiny sizes: data loading and checks,
augmentation, the loss falls, the checkpoint reloads, DDP under torchrun."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from perceiver_fast.train import (CHECKPOINT_FILES, TrainConfig, augment, build_model, load_arrays, make_dataset,
                                  save_checkpoint, train)

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
        with pytest.raises(ValueError, match=msg):
            load_arrays(str(p))
    notzip = tmp_path / "broken.npz"
    notzip.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read"):
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
    for name in ("model.safetensors", "config.json", "training.json", "metrics.json", "training.png"):
        assert (tmp_path / name).is_file()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary files left
    info = json.load(open(tmp_path / "training.json"))
    net, _ = build_model(info["model"], info["image_shape"], info["num_classes"], "eager", "tiny")
    net.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    # the folder is a from_pretrained folder: same class, same config, same weights
    from perceiver_fast.models import Perceiver, PerceiverIO, ViT

    cls = {"perceiver": Perceiver, "perceiver-io": PerceiverIO, "vit": ViT}[model]
    loaded = cls.from_pretrained(str(tmp_path)).eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x), net.eval()(x))


def test_unknown_model_is_a_usage_error():
    with pytest.raises(ValueError, match="unknown model"):
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
    with pytest.raises(ValueError, match=r"H, W, C >= 1.*\(20, "):
        load_arrays(str(p))


def test_model_that_cannot_be_built_is_a_usage_error():
    # 10**12 classes: the classifier cannot be allocated (was a RuntimeError traceback)
    with pytest.raises(ValueError, match="cannot build vit .* 1000000000000 classes"):
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


def _npz(path, y, n=None, hw=6):
    y = np.asarray(y)
    np.savez(path, x=np.random.randint(0, 255, (len(y), hw, hw, 1), dtype=np.uint8), y=y)
    return str(path)


def test_sparse_labels_are_remapped_and_the_mapping_saved(tmp_path):
    # 19 zeros and one 2,000,000: two classes (was a 2,000,001-class head and a 521 MB checkpoint)
    data = _npz(tmp_path / "sparse.npz", [0] * 19 + [2_000_000])
    ds = make_dataset(data, seed=0)
    assert ds.num_classes == 2 and ds.labels == [0, 2_000_000]
    assert set(torch.cat([ds.y_train, ds.y_test]).tolist()) == {0, 1}
    out = tmp_path / "run"
    train(TrainConfig(model="vit", size="tiny", attention="eager", dataset=data, epochs=1, batch_size=8,
                      out=str(out), quiet=True))
    assert json.load(open(out / "training.json"))["labels"] == [0, 2_000_000]
    assert json.load(open(out / "config.json"))["num_classes"] == 2
    assert os.path.getsize(out / "model.safetensors") < 1_000_000


def test_negative_labels_are_remapped_too():
    from perceiver_fast.train import encode_labels

    y, labels = encode_labels(np.array([-1, 1, -1, 1, 5, 5]))
    assert labels == [-1, 1, 5] and y.tolist() == [0, 1, 0, 1, 2, 2]


@pytest.mark.parametrize("y,match", [
    ([3] * 20, "a single label"),
    (list(range(20)), "20 distinct labels for 20 examples"),
    ((list(range(11)) * 2)[:21], "11 distinct labels for 21 examples"),
])
def test_labels_that_cannot_train_a_classifier_are_refused(tmp_path, y, match):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(size="tiny", attention="eager", dataset=_npz(tmp_path / "d.npz", y), epochs=1,
                          out=str(out), quiet=True))
    assert not out.exists()  # a rejected dataset leaves no folder behind


@pytest.mark.parametrize("field,value,exc,match", [
    ("seed", -1, ValueError, "seed must be >= 0, got -1"),
    ("seed", 2**32, ValueError, "seed must be <= 4294967295"),
    ("seed", 1.5, TypeError, "seed must be an int"),
    ("lr", float("inf"), ValueError, "lr must be a finite number > 0, got inf"),
    ("lr", float("nan"), ValueError, "lr must be a finite number > 0, got nan"),
    ("lr", 0.0, ValueError, "lr must be a finite number > 0"),
    ("weight_decay", -0.1, ValueError, "weight_decay must be a finite number >= 0"),
    ("warmup_epochs", float("inf"), ValueError, "warmup_epochs must be a finite number"),
    ("epochs", 0, ValueError, "epochs must be >= 1"),
    ("epochs", 2.5, TypeError, "epochs must be an int"),
    ("batch_size", 0, ValueError, "batch_size must be >= 1"),
    ("shift", -1, ValueError, "shift must be >= 0"),
    ("test_fraction", 1.0, ValueError, "test_fraction must be a finite number > 0 and < 1"),
    ("test_fraction", 0.0, ValueError, "test_fraction must be a finite number > 0 and < 1"),
    ("max_steps", 0, ValueError, "max_steps must be >= 1"),
    ("limit", -5, ValueError, "limit must be >= 1"),
    ("model", "resnet", ValueError, "model must be one of"),
    ("attention", "flash", ValueError, "attention must be one of"),
    ("size", "huge", ValueError, "size must be one of"),
    ("device", "tpu", ValueError, "device 'tpu' is not a device"),
    ("dataset", "", ValueError, "dataset must be"),
])
def test_every_config_field_is_range_checked_before_any_work(tmp_path, monkeypatch, field, value, exc, match):
    from perceiver_fast import train as T

    def no_work(*a, **k):
        raise AssertionError("data was loaded before the config was checked")

    monkeypatch.setattr(T, "make_dataset", no_work)
    out = tmp_path / "run"
    cfg = TrainConfig(size="tiny", attention="eager", epochs=1, out=str(out), quiet=True)
    with pytest.raises(exc, match=match):
        train(__import__("dataclasses").replace(cfg, **{field: value}))
    assert not out.exists()


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match="out .* exists and is not a folder"):
        train(TrainConfig(size="tiny", out=str(afile), quiet=True))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A loss that turns NaN in epoch 3 stops training; the folder holds epoch 2's checkpoint and strict JSON."""
    from perceiver_fast import train as T

    calls = {"n": 0}
    real = T.F.cross_entropy

    def nan_after_two_epochs(logits, y, **kw):
        loss = real(logits, y, **kw)
        if logits.requires_grad:
            calls["n"] += 1
            if calls["n"] > 2 * 4:  # 4 steps per epoch
                return loss * float("nan")
        return loss

    monkeypatch.setattr(T.F, "cross_entropy", nan_after_two_epochs)
    cfg = TrainConfig(model="vit", size="tiny", attention="eager", epochs=5, limit=80, batch_size=16, shift=0,
                      out=str(tmp_path), quiet=True)
    with pytest.raises(T.NonFiniteLossError, match=r"loss is nan at epoch 3.*last good checkpoint \(epoch 2\)"):
        train(cfg)
    metrics = json.loads(open(tmp_path / "metrics.json").read(),
                         parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert len(metrics["history"]) == 2 and all(math.isfinite(v) for v in metrics["step_losses"])
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "model.safetensors")).values())


def test_diverging_loss_from_a_huge_lr_is_one_line_exit_2(tmp_path, capsys):
    from perceiver_fast.cli import main

    out = tmp_path / "run"
    code = main(["train", "--model", "vit", "--size", "tiny", "--attention", "eager", "--epochs", "3", "--limit",
                 "60", "--lr", "1e30", "--shift", "0", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("perceiver-fast: error")]
    assert len(lines) == 1 and "training loss is" in lines[0], err


def test_checkpoint_leaves_the_users_other_files_alone(tmp_path):
    """save_pretrained also writes a model card; only the checkpoint's own files reach --out."""
    pytest.importorskip("huggingface_hub", reason="save_pretrained needs huggingface_hub ([hub] extra)")
    (tmp_path / "README.md").write_text("my notes")
    model, _ = build_model("vit", (1, 8, 8), 3, "eager")
    save_checkpoint(model, str(tmp_path), {"epoch": 1})
    assert (tmp_path / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CHECKPOINT_FILES + ("README.md",))
