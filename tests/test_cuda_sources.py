"""The CUDA sources of the native backend compile without a GPU (and without CUDA torch).

No machine that runs the tests has a GPU, so these checks keep csrc/cuda honest: the .cu
files include no torch header (they must compile with plain ``nvcc -c``), they compile for
sm_80 and sm_90 with no register spills in the main kernels, and the torch-side bindings parse.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
MAIN_KERNELS = (
    "attention_forward_kernel",
    "attention_decode_split_kernel",
    "add_layer_norm_forward_kernel",
    "add_layer_norm_backward_kernel",
)
ARCHS = ("sm_80", "sm_90")


def test_cuda_sources_exist():
    names = {p.name for p in CU_SOURCES}
    assert {"add_layer_norm.cu", "attention.cu"} <= names
    assert (CUDA_DIR / "launchers.h").is_file() and (CUDA_DIR / "bindings.cpp").is_file()


@pytest.mark.parametrize("path", CU_SOURCES + [CUDA_DIR / "launchers.h", CUDA_DIR / "limits.h"], ids=lambda p: p.name)
def test_cuda_sources_include_no_torch_header(path):
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), flags=re.M)
    torch_headers = [h for h in includes if re.match(r"(torch|ATen|c10|caffe2)/", h)]
    assert not torch_headers, f"{path.name} includes torch headers {torch_headers}: use launchers.h only"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Runs check_compile.sh once: (completed process, {(arch, kernel): resources})."""
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    result = subprocess.run(
        ["bash", str(CUDA_DIR / "check_compile.sh"), str(out_dir)], capture_output=True, text=True, timeout=1800
    )
    kernels = {}
    summary = out_dir / "summary.txt"
    for line in summary.read_text().splitlines() if summary.exists() else []:
        # "sm_80 regs=96 stack=0 spill_stores=0 spill_loads=0 attention_forward_kernel<__half, 64>"
        fields = line.split(" ", 5)
        values = dict(f.split("=") for f in fields[1:5])
        kernels[(fields[0], fields[5])] = {k: int(v) for k, v in values.items()}
    return result, kernels


def test_check_compile_succeeds(compiled):
    result, kernels = compiled
    assert result.returncode == 0, f"check_compile.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    for kernel in MAIN_KERNELS:
        for arch in ARCHS:
            assert any(a == arch and name.startswith(kernel + "<") for a, name in kernels), f"{kernel} for {arch}"


def test_main_kernels_do_not_spill(compiled):
    _, kernels = compiled
    spilling = {
        f"{arch} {name}": r
        for (arch, name), r in kernels.items()
        if name.split("<")[0] in MAIN_KERNELS and (r["spill_stores"] or r["spill_loads"] or r["stack"])
    }
    assert not spilling, f"kernels that use local memory (ptxas): {spilling}"


def _cuda_include_dir():
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_runtime_api.h").is_file():
            return Path(home) / "include"
    return None


def test_bindings_parse_against_torch_headers():
    """bindings.cpp uses only c10 core headers for devices and streams, so it parses with CPU torch."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        pytest.skip("needs a C++ compiler (g++)")
    cuda_include = _cuda_include_dir()
    if cuda_include is None:
        pytest.skip("needs the CUDA toolkit headers (cuda_runtime_api.h)")
    from torch.utils.cpp_extension import include_paths

    # C++20, as cpp_extension builds it for current torch (whose headers refuse C++17)
    command = [compiler, "-fsyntax-only", "-std=c++20", "-DFASTGPT_WITH_CUDA", f"-I{cuda_include}", f"-I{ROOT / 'csrc'}"]
    command += [f"-I{p}" for p in include_paths()]
    command.append(str(CUDA_DIR / "bindings.cpp"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 0, "bindings.cpp does not parse:\n" + "\n".join(errors[:30] or [result.stderr[-3000:]])
