"""Building fastgpt._C on first use (fastgpt/extension.py): the cache key, the lock, FASTGPT_BUILD,
and the message for an extension built against another torch.

No test here compiles anything: builds are stand-in functions that write a file, and the module
those files would hold is never imported (the real extension is already loaded in this process).
CI's downstream check (.ci/run, tests/downstream) runs a real first-use build.
"""

import dataclasses
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastgpt import extension

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_process(monkeypatch, tmp_path):
    """load() as a process that has not loaded fastgpt._C yet, with an empty cache in tmp_path/cache.
    Returns the list of (folder, spec) builds asked for; 'loading' a build returns its path."""
    monkeypatch.setenv("FASTGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTGPT_BUILD", raising=False)
    monkeypatch.delitem(sys.modules, extension.MODULE, raising=False)
    monkeypatch.setattr(extension, "_import_from", lambda path: f"module from {path}")
    return []


def fake_build_into(builds):
    def build_into(folder, csrc_dir, spec, announce):
        builds.append((folder, spec))
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / extension._artifact_name()
        target.write_bytes(b"not a library")
        return target

    return build_into


def load(builds, installed=None):
    return extension.load(installed=lambda: installed, build_into=fake_build_into(builds), announce=lambda _: None)


def stamped_file(path, torch_version, abi="1"):
    path.write_bytes(b"\x7fELF junk\0fastgpt-build-stamp:torch=" + torch_version.encode() + b";cxx11_abi="
                     + abi.encode() + b";\0more junk")
    return str(path)


def torch_release():
    return torch.__version__.split("+")[0]


# ----------------------------------------------------------------------------- the cache key


def test_key_changes_with_every_field_of_the_spec():
    spec = extension.current_spec(extension.source_dir())
    assert spec.torch_version == torch.__version__ and spec.cuda_version == torch.version.cuda
    changes = {
        "torch_version": "2.99.0+cpu",
        "cuda_version": "12.8",
        "cxx11_abi": not spec.cxx11_abi,
        "python": "cpython-399-linux-x86_64",
        "with_cuda": not spec.with_cuda,
        "cuda_archs": ("100",),
        "source_hash": "0" * 64,
    }
    keys = {dataclasses.replace(spec, **{name: value}).key() for name, value in changes.items()}
    assert len(keys | {spec.key()}) == len(changes) + 1
    assert spec.key() == extension.current_spec(extension.source_dir()).key(), "the key must be reproducible"


@pytest.mark.parametrize("edited", ["cpu/attention.cpp", "cpu/simd.h", "cuda/limits.h"])
def test_source_hash_changes_with_any_source_or_header(tmp_path, edited):
    csrc = tmp_path / "csrc"
    shutil.copytree(extension.source_dir(), csrc)
    before = extension.source_hash(csrc, False, ())
    with open(csrc / edited, "a") as f:
        f.write("\n// edited\n")
    assert extension.source_hash(csrc, False, ()) != before


def test_another_torch_version_builds_anew_and_a_built_one_is_reused(fresh_process, monkeypatch):
    builds = fresh_process
    first = load(builds)
    assert first.origin == "first-use" and first.error is None and len(builds) == 1
    assert load(builds).path == first.path and len(builds) == 1, "a cached build must be reused"
    monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")
    second = load(builds)
    assert len(builds) == 2 and second.path != first.path and "torch2.99.0+cpu" in second.path


def test_changed_sources_build_anew(fresh_process, monkeypatch, tmp_path):
    builds = fresh_process
    csrc = tmp_path / "csrc"
    shutil.copytree(extension.source_dir(), csrc)
    monkeypatch.setattr(extension, "source_dir", lambda: csrc)
    first = load(builds)
    (csrc / "cpu" / "attention.cpp").write_text((csrc / "cpu" / "attention.cpp").read_text() + "\n")
    second = load(builds)
    assert len(builds) == 2 and first.path != second.path


# ----------------------------------------------------------------------------- FASTGPT_BUILD


def test_never_refuses_to_build_and_says_why(fresh_process, monkeypatch):
    builds = fresh_process
    monkeypatch.setenv("FASTGPT_BUILD", "never")
    loaded = load(builds)
    assert loaded.module is None and not builds
    assert "FASTGPT_BUILD=never" in loaded.error and "fastgpt build" in loaded.error


def test_never_still_loads_a_build_made_earlier(fresh_process, monkeypatch):
    builds = fresh_process
    built = load(builds)
    monkeypatch.setenv("FASTGPT_BUILD", "never")
    assert load(builds).path == built.path and len(builds) == 1


def test_never_makes_the_native_backend_report_the_reason(fresh_process, monkeypatch):
    import importlib

    import fastgpt
    from fastgpt import native

    monkeypatch.setenv("FASTGPT_BUILD", "never")
    monkeypatch.setattr(extension, "installed_path", lambda: None)
    monkeypatch.delitem(sys.modules, extension.MODULE, raising=False)  # importing native loaded it
    try:
        reloaded = importlib.reload(native)
        ok, reason = reloaded.available()
        assert not ok and "FASTGPT_BUILD=never" in reason
        assert "FASTGPT_BUILD=never" in fastgpt.backends()["native"]["reason"]
    finally:
        monkeypatch.undo()
        importlib.reload(native)
    assert native.available()[0]


def test_an_unknown_policy_is_an_error_naming_the_variable(fresh_process, monkeypatch):
    monkeypatch.setenv("FASTGPT_BUILD", "sometimes")
    loaded = load(fresh_process)
    assert loaded.module is None and "FASTGPT_BUILD must be one of" in loaded.error and "'sometimes'" in loaded.error


def test_a_failed_build_is_reported_not_retried(fresh_process):
    builds = fresh_process
    spec = extension.current_spec(extension.source_dir())
    folder = extension.cache_root() / spec.key()
    folder.mkdir(parents=True)
    (folder / "failed").write_text("compiling fastgpt._C failed: no compiler")
    loaded = load(builds)
    assert loaded.module is None and not builds
    assert "no compiler" in loaded.error and "fastgpt build" in loaded.error


# ----------------------------------------------------------------------------- another torch


def test_stamp_of_the_loaded_extension_names_its_torch():
    from fastgpt import native

    if not native.available()[0]:
        pytest.skip(f"native extension: {native.available()[1]}")
    abi = str(int(torch._C._GLIBCXX_USE_CXX11_ABI))
    assert extension.read_stamp(native._C.__file__) == (torch_release(), abi)
    assert extension.torch_mismatch(native._C.__file__) is None


def test_an_extension_for_another_torch_is_named_not_loaded(fresh_process, monkeypatch, tmp_path):
    builds = fresh_process
    other = stamped_file(tmp_path / "_C.so", "2.1.0")
    message = extension.torch_mismatch(other)
    assert "torch 2.1.0" in message and f"torch {torch_release()}" in message and other in message

    monkeypatch.setenv("FASTGPT_BUILD", "never")
    refused = load(builds, installed=other)
    assert refused.module is None and not builds
    assert "torch 2.1.0" in refused.error and f"torch {torch_release()}" in refused.error
    assert "undefined symbol" not in refused.error and "ELF" not in refused.error

    monkeypatch.setenv("FASTGPT_BUILD", "auto")
    rebuilt = load(builds, installed=other)
    assert rebuilt.origin == "first-use" and len(builds) == 1 and "torch 2.1.0" in rebuilt.notes[0]


def test_another_cxx_abi_is_a_mismatch(tmp_path):
    other_abi = str(1 - int(torch._C._GLIBCXX_USE_CXX11_ABI))
    message = extension.torch_mismatch(stamped_file(tmp_path / "_C.so", torch_release(), other_abi))
    assert message is not None and f"ABI {other_abi}" in message


def test_an_installed_build_for_this_torch_is_used(fresh_process, monkeypatch, tmp_path):
    builds = fresh_process
    monkeypatch.setattr(extension.importlib, "import_module", lambda name: f"imported {name}")
    loaded = load(builds, installed=stamped_file(tmp_path / "_C.so", torch_release()))
    assert loaded.origin == "install-time" and loaded.module == "imported fastgpt._C" and not builds


# ----------------------------------------------------------------------------- the lock

LOCK_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fastgpt import extension

    folder, counter, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    # start together: both arrive at ensure_built while neither has built
    (counter.parent / f"ready-{name}").touch()
    while len(list(counter.parent.glob("ready-*"))) < 2:
        time.sleep(0.01)

    def build(work_dir):
        with open(counter, "a") as f:
            f.write("built\\n")
        time.sleep(1.5)  # long enough for the other process to find the lock taken
        (work_dir / "artifact").write_text("done")

    print(extension.ensure_built(folder, build, "artifact", announce=print))
    """
)


def test_two_processes_build_once(tmp_path):
    folder, counter = tmp_path / "key", tmp_path / "counter"
    workers = [
        subprocess.Popen([sys.executable, "-c", LOCK_WORKER, str(folder), str(counter), name],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), outputs
    assert counter.read_text() == "built\n", "the build ran more than once"
    assert sum("waiting for another process" in out for out, _ in outputs) == 1, "one process must wait on the lock"
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert paths == {str(folder / "artifact")} and (folder / "artifact").read_text() == "done"
    assert not (folder / "build").exists(), "the work folder is removed once the artifact is in place"


# ----------------------------------------------------------------------------- fastgpt build, fastgpt info


def test_build_ahead_of_time_retries_a_failed_build(fresh_process, monkeypatch):
    builds = fresh_process
    monkeypatch.setattr(extension, "installed_path", lambda: None)
    monkeypatch.setattr(extension, "_build_into", fake_build_into(builds))
    monkeypatch.setenv("FASTGPT_BUILD", "never")  # `fastgpt build` is the explicit request
    folder = extension.cache_root() / extension.current_spec(extension.source_dir()).key()
    folder.mkdir(parents=True)
    (folder / "failed").write_text("no compiler")
    origin, path = extension.build()
    assert origin == "first-use" and Path(path).parent == folder and len(builds) == 1
    assert not (folder / "failed").exists()


def test_build_ahead_of_time_keeps_an_install_time_build_for_this_torch(fresh_process, monkeypatch, tmp_path):
    builds = fresh_process
    installed = stamped_file(tmp_path / "_C.so", torch_release())
    monkeypatch.setattr(extension, "installed_path", lambda: installed)
    monkeypatch.setattr(extension, "_build_into", fake_build_into(builds))
    assert extension.build() == ("install-time", installed) and not builds


def test_describe_says_how_and_where_it_was_built(fresh_process):
    class Module:
        @staticmethod
        def build_info():
            return {"torch": "2.13.0", "cuda": False}

    report = extension.describe(extension.Loaded(Module(), origin="first-use", path="/cache/x/_C.so"))
    assert report["origin"] == "first-use" and report["path"] == "/cache/x/_C.so" and report["torch"] == "2.13.0"
    assert report["cache"] == str(extension.cache_root()) and report["FASTGPT_BUILD"] == "auto"
    failed = extension.describe(extension.Loaded(None, "no compiler", notes=("built for torch 2.1.0",)))
    assert failed["error"] == "no compiler" and failed["notes"] == ["built for torch 2.1.0"]
