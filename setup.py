"""Build of perceiver_fast and its C++/CUDA extension, perceiver_fast._C.

Install torch first (pinned), then: pip install --no-build-isolation -e .

Environment variables:
  PERCEIVER_FAST_FORCE_CUDA=1   build the CUDA kernels even if auto-detection says no
  PERCEIVER_FAST_SKIP_CUDA=1    build the CPU kernels only
  PERCEIVER_FAST_CUDA_ARCHS     compute capabilities, e.g. "80;90" (default) or "90"
  MAX_JOBS                      parallel compile jobs (ninja)
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _cuda_archs() -> list:
    archs = os.environ.get("PERCEIVER_FAST_CUDA_ARCHS", "80;90")
    out = []
    for a in archs.replace(",", ";").split(";"):
        a = a.strip().replace(".", "").replace("sm_", "")
        if a:
            out += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return out


def _want_cuda(torch, cpp_extension) -> bool:
    if _flag("PERCEIVER_FAST_SKIP_CUDA"):
        return False
    has_nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    if _flag("PERCEIVER_FAST_FORCE_CUDA"):
        if torch.version.cuda is None:
            raise RuntimeError(
                "PERCEIVER_FAST_FORCE_CUDA=1 but this torch is a CPU-only build "
                f"({torch.__version__}); install a CUDA build of torch first"
            )
        return True
    return torch.version.cuda is not None and has_nvcc


def _extensions():
    import torch
    from torch.utils import cpp_extension

    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # No -std flag: BuildExtension adds the one this torch needs (C++20 from torch 2.10 on).
    cxx = ["-O3", "-fno-math-errno", "-DPERCEIVER_FAST_PYTHON_MODULE"]
    # `import perceiver_fast._C` before `import torch` must find libc10.so etc.:
    # rpath to torch/lib, both next to an installed package and absolute (editable).
    torch_lib = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "lib")
    link = [f"-Wl,-rpath,$ORIGIN/../torch/lib:{torch_lib}"]
    if _want_cuda(torch, cpp_extension):
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + _cuda_archs()
        return [
            cpp_extension.CUDAExtension(
                "perceiver_fast._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=link,
            )
        ]
    return [
        cpp_extension.CppExtension(
            "perceiver_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


HUB = ["huggingface_hub>=0.22", "safetensors"]
EXTRAS = {
    "hub": HUB,  # save_pretrained / from_pretrained
    "hf": ["transformers"],  # HF Perceiver conversion, patching and bench baselines
    "timm": ["timm"],  # timm ViT conversion, patching and bench baselines
    "train": ["numpy", "scikit-learn", "matplotlib", "tqdm"] + HUB,  # perceiver-fast train
}
EXTRAS["dev"] = sorted({d for deps in EXTRAS.values() for d in deps} | {"pytest", "pytest-benchmark", "ninja",
                                                                         "pybind11"})

setup(
    name="perceiver_fast",
    version="0.1.0",
    description="Fused GPU kernels for the Perceiver, Perceiver IO and ViT",
    packages=find_packages(include=["perceiver_fast*"]),
    python_requires=">=3.10",
    # The kernels, layers, models and `perceiver-fast bench` need only torch and triton; the rest is opt-in.
    install_requires=["torch", "triton>=3.6"],
    extras_require=EXTRAS,
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    entry_points={"console_scripts": ["perceiver-fast=perceiver_fast.cli:main"]},
    zip_safe=False,
)
