"""Build fastgpt and its C++/CUDA extension ``fastgpt._C``.

The CPU part of the extension always builds. The CUDA part builds when torch is a CUDA
build and a CUDA toolkit is found; ``FASTGPT_CUDA=1`` forces it and ``FASTGPT_CUDA=0``
disables it. ``FASTGPT_NO_EXTENSION=1`` skips the extension entirely (the package then
works with the ``reference`` and ``triton`` backends only). Build with
``pip install --no-build-isolation -e .`` so the extension compiles against the torch you have.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda(torch_cuda_home, torch_cuda_version):
    forced = os.environ.get("FASTGPT_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "False")
    return torch_cuda_home is not None and torch_cuda_version is not None


def _set_cuda_home_past_wrapper_scripts():
    """cpp_extension takes CUDA_HOME from the folder above the nvcc on PATH. Where that nvcc is a
    wrapper script (/usr/local/bin/nvcc on some images) it would get /usr/local, which has no
    CUDA headers or libraries: unless CUDA_HOME or CUDA_PATH is set, prefer a folder that has them."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for folder in candidates + ["/usr/local/cuda"]:
        if os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = folder
            return


def _extensions():
    if os.environ.get("FASTGPT_NO_EXTENSION") == "1":
        return [], {}
    _set_cuda_home_past_wrapper_scripts()  # before cpp_extension reads it at import
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fastgpt: torch is not installed; building without the C++ extension "
              "(install torch first and use --no-build-isolation)", file=sys.stderr)
        return [], {}

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # no -std flag: cpp_extension adds the standard this torch's headers need (C++17 for older
    # releases, C++20 for newer ones; torch 2.14's headers refuse anything older than C++20)
    cxx_flags = ["-O3", "-fopenmp", "-DFASTGPT_OPENMP"]
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; at::parallel_for still works
        cxx_flags = ["-O3"]
    define_macros = []
    use_cuda = _want_cuda(CUDA_HOME, torch.version.cuda)
    if use_cuda:
        archs = os.environ.get("FASTGPT_CUDA_ARCHS", "80;90")
        cu_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo"]
        for arch in archs.split(";"):
            nvcc_flags += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        define_macros.append(("FASTGPT_WITH_CUDA", None))
        define_macros.append(("FASTGPT_CUDA_ARCHS", f'"{archs}"'))
        ext = CUDAExtension(
            "fastgpt._C",
            sources=cpp_sources + cu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=[] if sys.platform == "darwin" else ["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fastgpt._C",
            sources=cpp_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=[] if sys.platform == "darwin" else ["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastgpt",
    version="0.1.0",
    description="Fast GPT kernels for PyTorch: Triton and C++/CUDA fused attention and add+LayerNorm",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fastgpt", "fastgpt.kernels"],
    package_dir={"fastgpt": "fastgpt", "fastgpt.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",
        "triton>=3.6; platform_system == 'Linux'",
    ],
    extras_require={"test": ["pytest>=7", "pytest-benchmark>=4"]},
    entry_points={"console_scripts": ["fastgpt = fastgpt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
