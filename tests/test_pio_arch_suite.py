"""pio-arch's own shipped test suite, green with every nn.MultiheadAttention on the fused path.

pio-arch (built on ``torch.nn.MultiheadAttention``) ships its tests in its sdist only. CI (``.ci/run``) downloads
and unpacks that sdist into ``build/cache/`` (nothing is fetched at test time, nothing is vendored); point
``PIO_ARCH_SUITE`` at another unpacked sdist to use it. The suite runs in a subprocess with the
``pio_arch_patch_plugin`` pytest plugin (tests/pio_arch_patch_plugin.py), which applies the global patch before
any test builds a model and counts the fused calls.

The fused op runs its PyTorch CPU path here (``TRITON_INTERPRET=0`` for the subprocess: the interpreter would take
about 2 minutes for the suite's sizes); ``PF_PIO_SUITE_INTERPRET=1`` runs the Triton kernels under the interpreter
instead. On a GPU machine the suite's CPU tensors take the same CPU path.
"""
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT

VERSION = "0.2.6"
DEFAULT_SUITE = os.path.join(ROOT, "build", "cache", f"pio_arch-{VERSION}")
HINT = (f"CI: pip download --no-deps --no-binary :all: --ignore-requires-python pio-arch=={VERSION} -d build/cache "
        f"&& tar xzf build/cache/pio_arch-{VERSION}.tar.gz -C build/cache")


def suite_dir() -> str:
    pio_arch = pytest.importorskip(
        "pio_arch", reason="pio-arch is not installed (CI: pip install --no-deps --ignore-requires-python "
                           f"pio-arch=={VERSION} numpy)")
    root = os.environ.get("PIO_ARCH_SUITE", DEFAULT_SUITE)
    if not os.path.isdir(os.path.join(root, "tests")):
        pytest.skip(f"pio-arch's test suite is not unpacked at {root} ({HINT})")
    installed = getattr(pio_arch, "__version__", None)
    with open(os.path.join(root, "PKG-INFO")) as f:
        shipped = re.search(r"^Version: (\S+)", f.read(), re.M).group(1)
    if installed is not None and installed != shipped:
        pytest.skip(f"the unpacked suite is pio-arch {shipped}, the installed package is {installed}")
    return root


def test_pio_arch_suite_passes_with_the_global_patch():
    root = suite_dir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests"), ROOT, env.get("PYTHONPATH", "")])
    env["TRITON_INTERPRET"] = "1" if os.environ.get("PF_PIO_SUITE_INTERPRET") == "1" else "0"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--import-mode=append",
           "-p", "pio_arch_patch_plugin", "tests"]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    tail = (p.stdout + p.stderr)[-4000:]
    assert p.returncode == 0, tail
    summary = re.search(r"(\d+) passed", tail)
    assert summary, tail
    assert not re.search(r"\d+ (failed|error)", tail), tail
    calls = re.search(r"nn\.MultiheadAttention calls: (\d+); fused attention calls: (\d+)", tail)
    assert calls, tail
    mha_calls, fused = int(calls.group(1)), int(calls.group(2))
    # Every pio-arch attention call passes need_weights=False and a key-padding mask whose every row attends a key
    # (its "safe" mask): the fused op expresses all of them, so none falls back.
    assert mha_calls > 0 and fused == mha_calls, tail
    print(f"pio-arch {VERSION} suite with the global patch: {summary.group(0)}; "
          f"{fused}/{mha_calls} nn.MultiheadAttention calls fused")
