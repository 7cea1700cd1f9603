"""Build fastgpt: the packages, the C++/CUDA sources shipped with them, and (when torch is importable
here) the extension ``fastgpt._C``. Project metadata is in pyproject.toml.

With torch importable at build time (``pip install --no-build-isolation``), ``fastgpt._C`` is
compiled now against that torch. Under pip's build isolation torch is not importable: the package
then installs without ``_C`` and builds it on first use against the torch it finds
(``fastgpt/extension.py``; ``fastgpt build`` does it ahead of time). ``FASTGPT_NO_EXTENSION=1``
skips the install-time build even where torch is importable. The sources and flags come from
``fastgpt/build_recipe.py``, which also says which environment variables choose CUDA.
"""

import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _load_recipe():
    # by path: importing the fastgpt package would import torch, absent under build isolation
    spec = importlib.util.spec_from_file_location("fastgpt_build_recipe", os.path.join(ROOT, "fastgpt", "build_recipe.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def _extensions(recipe):
    if os.environ.get("FASTGPT_NO_EXTENSION") == "1":
        return [], {}
    recipe.set_cuda_home_past_wrapper_scripts()  # before cpp_extension reads it at import
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "fastgpt: torch is not importable at build time (pip's build isolation): fastgpt._C will be "
            "built on first use against the torch installed then (or run `fastgpt build`)",
            file=sys.stderr,
        )
        return [], {}

    with_cuda = recipe.want_cuda(CUDA_HOME, torch.version.cuda)
    archs = recipe.cuda_archs() if with_cuda else []
    defines, cxx, nvcc, link = recipe.compile_flags(with_cuda, archs)
    sources = [os.path.relpath(path, ROOT) for path in recipe.source_files(CSRC, with_cuda)]
    kind, compile_args = (CUDAExtension, {"cxx": cxx, "nvcc": nvcc}) if with_cuda else (CppExtension, {"cxx": cxx})
    ext = kind(
        f"fastgpt.{recipe.EXTENSION_NAME}",
        sources=sources,
        include_dirs=[CSRC],
        define_macros=defines,
        extra_compile_args=compile_args,
        extra_link_args=link,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


# The C++/CUDA sources travel inside the package as fastgpt/csrc (data only), so an install
# without the install-time build can still compile them on first use.
CSRC_PACKAGES = {"fastgpt.csrc": "csrc", "fastgpt.csrc.cpu": "csrc/cpu", "fastgpt.csrc.cuda": "csrc/cuda"}

ext_modules, cmdclass = _extensions(_load_recipe())

setup(
    packages=find_packages(include=["fastgpt", "fastgpt.*"]) + ["fastgpt.kernels"] + list(CSRC_PACKAGES),
    package_dir={"fastgpt.kernels": "kernels", **CSRC_PACKAGES},
    # auto's measured tables (fastgpt/auto_tables/<device class>.json, written by fastgpt bench --tune)
    package_data={"fastgpt": ["auto_tables/*.json"], **{name: ["*.cpp", "*.h", "*.cu"] for name in CSRC_PACKAGES}},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
