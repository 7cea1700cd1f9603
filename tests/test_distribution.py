"""What fastgpt's sdist and wheel hold, and the one version they carry.

Built here without build isolation and without the extension (FASTGPT_NO_EXTENSION=1), as an
isolated build would make them: a few seconds, no compiler. CI installs both into a fresh
virtualenv and runs the downstream check (.ci/package_check).
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import fastgpt

ROOT = Path(__file__).resolve().parents[1]
BUILD_SOURCES = {"csrc/extension.cpp", "csrc/alloc_output.h", "csrc/cpu/ops.h", "csrc/cpu/attention.cpp",
                 "csrc/cuda/launchers.h", "csrc/cuda/limits.h", "csrc/cuda/attention.cu", "csrc/cuda/bindings.cpp"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """{"sdist": file names in it, "wheel": file names in it}, built from a copy of the tracked files."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the distributions are built from its tracked files)")
    work = tmp_path_factory.mktemp("dist")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if (ROOT / name).is_file():
            (work / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, work / "src" / name)
    env = dict(os.environ, FASTGPT_NO_EXTENSION="1")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(work / "out"), "bdist_wheel", "-d",
                    str(work / "out")], cwd=work / "src", env=env, capture_output=True, check=True, timeout=600)
    (sdist,) = (work / "out").glob("*.tar.gz")
    (wheel,) = (work / "out").glob("*.whl")
    with tarfile.open(sdist) as archive:
        sdist_names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    return {"sdist": sdist_names, "wheel": set(zipfile.ZipFile(wheel).namelist()), "wheel_name": wheel.name}


def test_sdist_holds_everything_a_build_needs(dist):
    missing = BUILD_SOURCES | {"README.md", "LICENSE", "pyproject.toml", "setup.py", "MANIFEST.in",
                               "fastgpt/build_recipe.py", "kernels/attention.py", "tests/downstream/pyproject.toml"}
    assert not missing - dist["sdist"]


def test_wheel_carries_the_sources_for_a_first_use_build(dist):
    shipped = {f"fastgpt/{name}" for name in BUILD_SOURCES}
    assert not shipped - dist["wheel"]
    assert {"fastgpt/extension.py", "fastgpt/build_recipe.py", "fastgpt/kernels/attention.py"} <= dist["wheel"]
    assert not any(name.startswith(("kernels/", "csrc/", "tests/")) for name in dist["wheel"])
    # every fastgpt subpackage is found without being listed by hand
    packages = {str(Path(name).parent) for name in dist["wheel"] if name.endswith("/__init__.py")}
    local = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "fastgpt").rglob("__init__.py") if "__pycache__" not in str(p)}
    tracked = subprocess.run(["git", "ls-files", "fastgpt"], cwd=ROOT, capture_output=True, text=True).stdout
    assert {p for p in local if f"{p}/__init__.py" in tracked} <= packages


def test_auto_tables_ship_in_both(dist):
    tables = {str(p.relative_to(ROOT)) for p in (ROOT / "fastgpt" / "auto_tables").glob("*.json")}
    assert tables, "fastgpt/auto_tables holds the measured tables backend='auto' reads"
    assert tables <= dist["sdist"] and tables <= dist["wheel"]


def test_wheel_carries_the_license(dist):
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in dist["wheel"])


def test_one_version(dist):
    assert fastgpt.__version__ == importlib.metadata.version("fastgpt")
    assert dist["wheel_name"].startswith(f"fastgpt-{fastgpt.__version__}-")


def test_extras_and_core_dependencies():
    requirements = importlib.metadata.requires("fastgpt")
    core = [r for r in requirements if "extra ==" not in r]
    extras = importlib.metadata.metadata("fastgpt").get_all("Provides-Extra")
    assert {"test", "hf", "bench"} <= set(extras)
    assert not any(r.startswith("matplotlib") for r in core), "only the benchmark plots need matplotlib"
    assert {"ninja", "filelock"} <= {r.split(";")[0].split(">")[0].strip() for r in core}
