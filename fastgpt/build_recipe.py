"""What ``fastgpt._C`` is compiled from, and with which flags: one recipe for both ways it is built.

``setup.py`` uses it at install time (it loads this file by path: under pip's build isolation the
``fastgpt`` package, which imports torch, cannot be imported there), and ``fastgpt.extension``
uses it to build on first use. This module imports nothing outside the standard library at import
time; only ``compile_extension`` needs torch.

Environment: ``FASTGPT_CUDA=1`` forces the CUDA kernels and ``0`` leaves them out (default: built
when torch is a CUDA build and a CUDA toolkit is found); ``FASTGPT_CUDA_ARCHS`` lists the GPU
architectures, ``;``-separated (default ``80;90``).
"""

import glob
import os
import shutil
import sys

EXTENSION_NAME = "_C"  # the module fastgpt._C; TORCH_EXTENSION_NAME in csrc/extension.cpp


def source_files(csrc_dir, with_cuda):
    """The files compiled into the extension, sorted: csrc/*.cpp and csrc/cpu/*.cpp, plus csrc/cuda's
    .cu and .cpp files for a CUDA build."""
    patterns = ["*.cpp", "cpu/*.cpp"] + (["cuda/*.cu", "cuda/*.cpp"] if with_cuda else [])
    return sorted(path for pattern in patterns for path in glob.glob(os.path.join(csrc_dir, pattern)))


def header_files(csrc_dir):
    """The headers the sources include: part of what a build depends on."""
    return sorted(glob.glob(os.path.join(csrc_dir, "**", "*.h"), recursive=True))


def set_cuda_home_past_wrapper_scripts():
    """cpp_extension takes CUDA_HOME from the folder above the nvcc on PATH. Where that nvcc is a
    wrapper script (/usr/local/bin/nvcc on some images) it would get /usr/local, which has no
    CUDA headers or libraries: unless CUDA_HOME or CUDA_PATH is set, prefer a folder that has them.
    Call before torch.utils.cpp_extension is imported (it reads CUDA_HOME then)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for folder in candidates + ["/usr/local/cuda"]:
        if os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = folder
            return


def want_cuda(cuda_home, torch_cuda_version):
    """Whether to compile the CUDA kernels, given cpp_extension's CUDA_HOME and torch.version.cuda."""
    forced = os.environ.get("FASTGPT_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "False")
    return cuda_home is not None and torch_cuda_version is not None


def cuda_archs():
    """The GPU architectures to compile for, e.g. ["80", "90"]."""
    return [arch for arch in os.environ.get("FASTGPT_CUDA_ARCHS", "80;90").split(";") if arch]


def compile_flags(with_cuda, archs):
    """(defines, cxx flags, nvcc flags, link flags). Defines are (name, value) pairs whose values
    need no shell quoting: cpp_extension writes flags into a ninja file unquoted."""
    # no -std flag: cpp_extension adds the standard this torch's headers need (C++17 for older
    # releases, C++20 for newer ones; torch 2.14's headers refuse anything older than C++20)
    cxx = ["-O3"] if sys.platform == "darwin" else ["-O3", "-fopenmp", "-DFASTGPT_OPENMP"]
    link = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple clang has no -fopenmp
    defines, nvcc = [], []
    if with_cuda:
        defines = [("FASTGPT_WITH_CUDA", None), ("FASTGPT_CUDA_ARCHS", ",".join(archs))]
        nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
        nvcc += [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
    return defines, cxx, nvcc, link


def compile_extension(csrc_dir, build_dir, with_cuda, archs, verbose=True):
    """Compile the extension into build_dir with torch.utils.cpp_extension.load (ninja); returns the
    path of the built library. It is also imported into this process (load() always imports it), so
    fastgpt.extension runs this file as a script in a child process and imports the result itself."""
    set_cuda_home_past_wrapper_scripts()
    from torch.utils.cpp_extension import load

    defines, cxx, nvcc, link = compile_flags(with_cuda, archs)
    define_flags = [f"-D{name}" if value is None else f"-D{name}={value}" for name, value in defines]
    module = load(
        name=EXTENSION_NAME,
        sources=source_files(csrc_dir, with_cuda),
        extra_include_paths=[csrc_dir],
        extra_cflags=define_flags + cxx,
        extra_cuda_cflags=define_flags + nvcc,
        extra_ldflags=link,
        build_directory=build_dir,
        with_cuda=with_cuda,
        verbose=verbose,
    )
    return module.__file__


if __name__ == "__main__":  # python build_recipe.py CSRC_DIR BUILD_DIR WITH_CUDA(0|1) [ARCH ...]
    compile_extension(sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4:])
