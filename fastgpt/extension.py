"""Finding and loading the C++/CUDA extension ``fastgpt._C``, and building it on first use.

An install with torch importable at build time (``pip install --no-build-isolation``) compiles
``_C`` into the package: that build is used when it was made for the torch now loaded. An install
under pip's build isolation has no ``_C`` (torch was not importable there), and a ``_C`` built for
another torch cannot load: in both cases the package's own sources (``fastgpt/csrc`` in an install,
``csrc/`` in a checkout) are compiled against the torch in this process, the first time the native
backend is asked for, into a user cache folder keyed by torch version, CUDA version, C++ ABI,
Python and a hash of the sources and flags. A file lock in that folder makes parallel processes
(pytest-xdist workers, torchrun ranks) build once; the others wait and load the result.

Environment: ``FASTGPT_BUILD=never`` forbids building (the native backend then says why it is
unavailable; ``fastgpt build`` still builds when asked); ``FASTGPT_CACHE_DIR`` moves the cache
(default ``$XDG_CACHE_HOME/fastgpt`` or ``~/.cache/fastgpt``).
"""

import hashlib
import importlib.machinery
import importlib.util
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from filelock import FileLock, Timeout

from fastgpt import build_recipe

MODULE = f"fastgpt.{build_recipe.EXTENSION_NAME}"
POLICIES = ("auto", "never")
LOCK_TIMEOUT_S = 3600  # a CUDA build for several architectures takes tens of minutes on few cores
_STAMP = re.compile(rb"fastgpt-build-stamp:torch=([^;\0]*);cxx11_abi=([^;\0]*);")


@dataclass(frozen=True)
class Loaded:
    """The outcome of ``load()``: the module, or why there is none, and how it was built."""

    module: Optional[object]
    error: Optional[str] = None
    origin: str = "none"  # "install-time" or "first-use" when loaded
    path: Optional[str] = None
    notes: tuple = field(default=())  # what happened on the way (e.g. an install-time build for another torch)


class BuildError(RuntimeError):
    """Building fastgpt._C failed or is not allowed; the message says why and what to do."""


# ----------------------------------------------------------------------------- where things are


def build_policy():
    """``FASTGPT_BUILD``: ``auto`` (default: build on first use when needed) or ``never``."""
    policy = os.environ.get("FASTGPT_BUILD", "auto") or "auto"
    if policy not in POLICIES:
        raise BuildError(f"FASTGPT_BUILD must be one of {POLICIES}, got {policy!r}")
    return policy


def cache_root():
    """Where first-use builds are kept: ``FASTGPT_CACHE_DIR``, else the user's cache folder."""
    configured = os.environ.get("FASTGPT_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fastgpt"


def source_dir():
    """The C++/CUDA sources: shipped inside the package (an install), or csrc/ beside it (a checkout)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "extension.cpp").is_file():
            return candidate
    raise BuildError(f"the C++ sources of fastgpt._C are missing (looked in {package / 'csrc'} and {package.parent / 'csrc'})")


def installed_path():
    """The install-time build of fastgpt._C, or None when the install made none."""
    spec = importlib.util.find_spec(MODULE)
    return spec.origin if spec is not None and spec.origin and os.path.isfile(spec.origin) else None


# ----------------------------------------------------------------------------- the cache key


@dataclass(frozen=True)
class BuildSpec:
    """Everything a build depends on; its key names the cache folder."""

    torch_version: str
    cuda_version: Optional[str]  # torch.version.cuda: None for a CPU build of torch
    cxx11_abi: bool
    python: str  # the interpreter's cache tag and platform: the built file is specific to both
    with_cuda: bool
    cuda_archs: tuple
    source_hash: str

    def key(self):
        """A readable folder name that changes with any field."""
        digest = hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:16]
        device = f"cuda{self.cuda_version}-sm{'_'.join(self.cuda_archs)}" if self.with_cuda else "cpu"
        return f"torch{self.torch_version}-{device}-{self.python}-{digest}"


def source_hash(csrc_dir, with_cuda, archs):
    """sha256 of every source and header (path and contents) and of the compile flags."""
    digest = hashlib.sha256()
    for path in build_recipe.source_files(str(csrc_dir), with_cuda) + build_recipe.header_files(str(csrc_dir)):
        digest.update(os.path.relpath(path, csrc_dir).encode() + b"\0" + Path(path).read_bytes() + b"\0")
    digest.update(repr(build_recipe.compile_flags(with_cuda, archs)).encode())
    return digest.hexdigest()


def current_spec(csrc_dir):
    """The BuildSpec for the torch in this process and the sources in csrc_dir."""
    build_recipe.set_cuda_home_past_wrapper_scripts()
    from torch.utils.cpp_extension import CUDA_HOME

    with_cuda = build_recipe.want_cuda(CUDA_HOME, torch.version.cuda)
    archs = tuple(build_recipe.cuda_archs()) if with_cuda else ()
    return BuildSpec(
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        cxx11_abi=bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        python=f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}",
        with_cuda=with_cuda,
        cuda_archs=archs,
        source_hash=source_hash(csrc_dir, with_cuda, archs),
    )


# ----------------------------------------------------------------------------- the torch a build is for


def read_stamp(path):
    """(torch version, C++ ABI "0"/"1") that the extension at path was compiled for, read from the
    file without loading it; None for a file without a stamp (built from older sources)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = data.find(b"fastgpt-build-stamp:")
        match = _STAMP.match(data[start : start + 256]) if start >= 0 else None
    return (match.group(1).decode(), match.group(2).decode()) if match else None


def torch_mismatch(path):
    """Why the extension at path cannot load into this torch (it was built for another), or None."""
    stamp = read_stamp(path)
    if stamp is None:
        return None  # older sources: loading it reports what is wrong, if anything
    built_for, abi = stamp
    running = re.match(r"\d+(\.\d+)*", torch.__version__).group(0)  # the headers' version: no +cpu, no .devN
    if built_for != running:
        return f"fastgpt._C at {path} was built for torch {built_for}, but this process runs torch {running}"
    running_abi = str(int(torch._C._GLIBCXX_USE_CXX11_ABI))
    if abi != running_abi:
        return f"fastgpt._C at {path} was built with C++11 ABI {abi}, but torch {running} uses ABI {running_abi}"
    return None


# ----------------------------------------------------------------------------- building once


def ensure_built(folder, build, artifact, announce=None):
    """The path of ``folder/artifact``, first calling ``build(work_dir)`` to make ``work_dir/artifact``
    unless it exists. A file lock in ``folder`` makes concurrent callers (threads or processes) build
    once: the others wait for it and get the same file. The artifact appears whole or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / artifact
    if target.exists():
        return target
    lock = FileLock(str(folder / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if announce:
            announce(f"waiting for another process that is building it ({folder})")
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise BuildError(f"gave up after {LOCK_TIMEOUT_S} s waiting for the build lock {folder / '.lock'}") from None
    try:
        if target.exists():  # built by whoever held the lock
            return target
        work_dir = folder / "build"
        work_dir.mkdir(exist_ok=True)
        build(work_dir)
        os.replace(work_dir / artifact, target)  # atomic: a reader sees the whole file or none
        shutil.rmtree(work_dir, ignore_errors=True)
        return target
    finally:
        lock.release()


def _announce(message):
    print(f"fastgpt: {message}", file=sys.stderr, flush=True)


def _compile_in_child(csrc_dir, spec):
    """A build function for ensure_built: compiles in a child process (cpp_extension imports what it
    builds, and this process must import it as fastgpt._C), printing one line per ninja step."""

    def build(work_dir):
        command = [sys.executable, build_recipe.__file__, str(csrc_dir), str(work_dir), "1" if spec.with_cuda else "0"]
        log_path = work_dir.parent / "build.log"
        started = time.monotonic()
        with open(log_path, "w") as log, subprocess.Popen(
            command + list(spec.cuda_archs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as child:
            for line in child.stdout:
                log.write(line)
                step = re.match(r"\[(\d+)/(\d+)\] .*?(?: -c (\S+)| -o (\S+\.so))", line)
                if step:
                    done, total, source, library = step.groups()
                    # ninja reports a step when it ends (its output is a pipe here)
                    what = f"compiled {os.path.relpath(source, csrc_dir)}" if source else f"linked {Path(library).name}"
                    _announce(f"[{done}/{total}] {what} ({time.monotonic() - started:.0f} s)")
        if child.returncode != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
            message = f"compiling fastgpt._C failed (full log: {log_path}):\n{tail}"
            (work_dir.parent / "failed").write_text(message)  # later processes report it instead of retrying
            raise BuildError(message)
        built = work_dir / f"{build_recipe.EXTENSION_NAME}.so"
        os.replace(built, work_dir / _artifact_name())
        (work_dir.parent / "build.json").write_text(
            json.dumps(dict(spec.__dict__, seconds=round(time.monotonic() - started, 1), sources=str(csrc_dir)), indent=2)
        )

    return build


def _artifact_name():
    return build_recipe.EXTENSION_NAME + importlib.machinery.EXTENSION_SUFFIXES[0]


def build(announce=_announce):
    """Make sure a fastgpt._C for this torch exists, building it into the cache if the install made
    none (whatever FASTGPT_BUILD says: this is the explicit request; a folder whose earlier build
    failed is tried again). Returns ("install-time" or "first-use", its path). Raises BuildError."""
    installed = installed_path()
    if installed is not None and torch_mismatch(installed) is None:
        return "install-time", installed
    csrc_dir = source_dir()
    spec = current_spec(csrc_dir)
    folder = cache_root() / spec.key()
    (folder / "failed").unlink(missing_ok=True)
    return "first-use", str(_build_into(folder, csrc_dir, spec, announce))


def describe(loaded):
    """How fastgpt._C was built and where it lives (for ``fastgpt info``), given what ``load()`` returned."""
    report = {"origin": loaded.origin, "path": loaded.path, "cache": str(cache_root()),
              "FASTGPT_BUILD": os.environ.get("FASTGPT_BUILD") or "auto"}
    if loaded.module is not None:
        report.update(loaded.module.build_info())
    else:
        report["error"] = loaded.error
    if loaded.notes:
        report["notes"] = list(loaded.notes)
    return report


def _build_into(folder, csrc_dir, spec, announce):
    target = folder / _artifact_name()
    if not target.exists():
        cuda = f"CUDA {spec.cuda_version}, sm {', '.join(spec.cuda_archs)}" if spec.with_cuda else "CPU only"
        announce(
            f"building the C++ extension fastgpt._C for torch {spec.torch_version} ({cuda}) into {folder}; "
            "this happens once per torch version and takes a few minutes"
        )
    return ensure_built(folder, _compile_in_child(csrc_dir, spec), _artifact_name(), announce)


# ----------------------------------------------------------------------------- loading


def _import_from(path):
    """Import the extension file at path as fastgpt._C."""
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE] = module
    import fastgpt

    setattr(fastgpt, build_recipe.EXTENSION_NAME, module)
    return module


def load(installed=None, build_into=None, announce=_announce):
    """Load fastgpt._C, building it first where needed and allowed. Never raises for a missing or
    unusable extension: the returned ``Loaded`` carries the reason. ``installed`` (default
    ``installed_path``) and ``build_into`` (default: compile the sources) are seams for the tests."""
    installed = installed or installed_path
    build_into = build_into or _build_into
    try:
        policy = build_policy()
    except BuildError as exc:
        return Loaded(None, str(exc))
    already = sys.modules.get(MODULE)
    if already is not None:  # a library that registers torch ops loads once per process
        path = already.__file__
        return Loaded(already, origin="first-use" if Path(path).is_relative_to(cache_root()) else "install-time", path=path)
    notes = []
    path = installed()
    if path is not None:
        mismatch = torch_mismatch(path)
        if mismatch is None:
            try:
                return Loaded(importlib.import_module(MODULE), origin="install-time", path=path)
            except ImportError as exc:
                return Loaded(None, f"the C++ extension fastgpt._C failed to load ({exc})", path=path)
        notes.append(mismatch)
    try:
        csrc_dir = source_dir()
        spec = current_spec(csrc_dir)
        folder = cache_root() / spec.key()
        target = folder / _artifact_name()
        if not target.exists():
            why = notes[0] if notes else "fastgpt._C was not built when fastgpt was installed"
            if policy == "never":
                raise BuildError(f"{why}, and FASTGPT_BUILD=never forbids building it (run `fastgpt build`)")
            if (folder / "failed").exists():
                raise BuildError(f"{why}, and building it failed before: {(folder / 'failed').read_text()} "
                                 "(run `fastgpt build` to try again)")
            announce(why)
            target = build_into(folder, csrc_dir, spec, announce)
        return Loaded(_import_from(target), origin="first-use", path=str(target), notes=tuple(notes))
    except (BuildError, ImportError, OSError) as exc:
        return Loaded(None, str(exc), path=path, notes=tuple(notes))
