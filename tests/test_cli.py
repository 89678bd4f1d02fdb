"""The perceiver-fast command, run as a user runs it: a subprocess, with
TRITON_INTERPRET removed from its environment (the test process sets it), so
that the fused ops take their CPU fallback, as they do for a CPU user."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=300, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "perceiver_fast", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _is_png(path):
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_quick_on_cpu_writes_csv_json_and_plots(tmp_path):
    out = tmp_path / "bench"
    p = cli("bench", "--quick", "--ops", "pio-conv,sweep,layers", "--models", "pio-learned", "--no-progress",
            "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Triton kernels need a" in p.stdout  # says plainly that the GPU kernels did not run
    for name in ("results.csv", "results.json", "table.txt", "targets.md"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "results.csv")))
    sections = {r["section"] for r in rows}
    assert sections == {"op", "sweep", "layer", "model"}
    layer = [r for r in rows if r["section"] == "layer"]
    assert {r["backend"] for r in layer} == {"hf:eager", "hf-patched:fused", "ours:fused"}
    assert all(r["status"] == "ok" for r in layer if r["backend"] == "ours:fused"), layer
    ops = [r for r in rows if r["section"] == "op"]
    assert {r["backend"] for r in ops} >= {"eager", "sdpa-math", "fused"}
    fused = [r for r in ops if r["backend"] == "fused"]
    assert fused and all(r["status"] == "ok" for r in fused), fused
    assert all(float(r["relerr"]) < 1e-4 for r in fused if r["direction"] == "fwd")
    assert all(float(r["grad_relerr"]) < 1e-4 for r in fused if r["direction"] == "fwd+bwd")
    assert all(float(r["ms_p20"]) <= float(r["ms"]) <= float(r["ms_p80"]) for r in fused)
    assert all(r["speedup_vs_eager"] for r in fused)
    models = [r for r in rows if r["section"] == "model"]
    hf = [r for r in models if r["backend"] == "hf:eager"]
    ours = [r for r in models if r["backend"] == "ours:fused"]
    assert ours and all(r["status"] == "ok" and float(r["images_per_s"]) > 0 for r in ours), ours
    data = json.load(open(out / "results.json"))
    assert data["env"]["fused_path"] == "torch"
    assert data["env"]["torch"] and data["env"]["date"] and "git_commit" in data["env"]
    assert len(data["rows"]) == len(rows)
    assert _is_png(out / "cross_attention_vs_M.png")
    if any(r["status"] == "ok" for r in models):
        assert _is_png(out / "models_images_per_s.png")
    assert hf  # transformers is a dev requirement: the HF baseline row exists (ok, or FAIL with a reason)


def test_bench_list_prints_counts():
    p = cli("bench", "--list")
    assert p.returncode == 0, p.stderr
    assert "pio-learned" in p.stdout and "420.9" in p.stdout  # GFLOP of the learned cross-attention


@pytest.mark.parametrize("args,message", [
    (("bench", "--ops", "nope"), "unknown op case 'nope'"),
    (("bench", "--models", "resnet"), "unknown model case 'resnet'"),
    (("train", "--dataset", "/no/such/file.npz"), "dataset file not found"),
    (("train", "--dataset", "data.csv"), "must be 'digits' or a .npz"),
])
def test_user_errors_are_one_line_not_a_traceback(args, message):
    p = cli(*args)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.startswith("perceiver-fast: error")]
    assert len(lines) == 1 and message in lines[0], p.stderr


def test_bad_array_shape_and_unknown_model(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((20, 8, 8), np.uint8), y=np.zeros(20, np.int64))
    p = cli("train", "--dataset", str(bad))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "x must be an N x H x W x C uint8 array" in p.stderr and "(20, 8, 8)" in p.stderr
    nokeys = tmp_path / "nokeys.npz"
    np.savez(nokeys, images=np.zeros((20, 8, 8, 1), np.uint8))
    p = cli("train", "--dataset", str(nokeys))
    assert p.returncode == 2 and "must hold arrays 'x' and 'y'" in p.stderr
    p = cli("train", "--model", "resnet")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "invalid choice: 'resnet'" in p.stderr


def test_train_cli_fused_on_cpu_writes_outputs(tmp_path):
    out = tmp_path / "run"
    p = cli("train", "--model", "perceiver-io", "--size", "tiny", "--epochs", "2", "--limit", "200",
            "--attention", "fused", "--out", str(out), env_extra={"TRITON_INTERPRET": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ignoring TRITON_INTERPRET=1" in p.stderr  # never the slow interpreter by accident
    assert "test acc" in p.stdout and "torch" in p.stdout
    for name in ("model.safetensors", "config.json", "metrics.json", "training.png"):
        assert (out / name).is_file(), name
    m = json.load(open(out / "metrics.json"))
    assert len(m["history"]) == 2 and 0.0 <= m["test_acc"] <= 1.0
    assert _is_png(out / "training.png")


def test_no_command_is_a_usage_error():
    p = cli()
    assert p.returncode == 2 and "usage: perceiver-fast" in p.stderr


@pytest.mark.parametrize("args,message", [
    (("bench", "--device", "tpu"), "--device 'tpu' is not a device"),
    (("bench", "--device", "meta"), "only cpu and cuda are supported"),
    (("train", "--device", "nope:x"), "is not a device"),
    (("bench", "--backends", "eager,nope"), "unknown backend 'nope'"),
    (("bench", "--out", "{file}"), "exists and is not a folder"),
    (("train", "--out", "{file}"), "exists and is not a folder"),
    (("train", "--lr", "-1"), "--lr must be a finite number > 0, got -1"),
    (("train", "--limit", "0"), "--limit must be >= 1"),
    (("train", "--seed", "-1"), "--seed must be >= 0, got -1"),
    (("train", "--lr", "inf"), "--lr must be a finite number > 0, got inf"),
    (("train", "--test-fraction", "1.5"), "--test-fraction must be a finite number > 0 and < 1"),
    (("train", "--warmup-epochs", "nan"), "--warmup-epochs must be a finite number"),
    (("bench", "--compare", "{file}"), "cannot read it as JSON"),
    (("train", "--max-steps", "0"), "--max-steps must be >= 1"),
    (("train", "--limit", "40", "--test-fraction", "0.99"), "--test-fraction 0.99 leaves none of the 40 examples"),
])
def test_more_user_errors_in_process(tmp_path, capsys, args, message):
    """Bad --device/--backends/--out and numbers: one line and status 2, before any work (was a traceback)."""
    from perceiver_fast.cli import main

    afile = tmp_path / "afile"
    afile.write_text("")
    assert main([a.format(file=afile) for a in args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err, err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("command", ["bench", "train"])
def test_cuda_device_without_gpu_is_a_usage_error(capsys, command):
    from perceiver_fast.cli import main

    assert main([command, "--device", "cuda"]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err
