"""Compile Triton kernels ahead of time for real GPUs, with no GPU present.

Run as a script in a process of its own — ``python tests/triton_aot.py fastgpt.kernels.attention
[function [jobs]]`` — because kernels defined under ``TRITON_INTERPRET=1`` (as in the test suite)
cannot be compiled. The kernel module lists what to compile in ``aot_compile_specs()`` (or the
function named): dicts with ``name, kernel, signature, constexprs, attrs, num_warps, num_stages``
and optionally ``targets`` (compute capabilities, default sm_80 and sm_90) and ``key`` (copied
into the record), one per configuration its launchers can pick, built by
``fastgpt.kernels.launch.aot_spec`` from the arguments a real launch passes. The script prints a
resource report and, last, one JSON line with a record per (spec, target), with the registers,
stack, shared memory and a few SASS instruction counts, in the whole kernel and in each loop.
``run_aot(module)`` does that from a test and returns the records.

``triton.compile`` with a ``GPUTarget`` runs the whole NVIDIA pipeline (TTIR → TTGIR → LLVM
→ PTX → cubin) on the CPU, so a kernel that only works in the interpreter fails here. The
resource report comes from the ``cuobjdump`` shipped inside the triton package.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

ARCHS = (80, 90)  # Ampere (A100) and Hopper (H100/H200)
# instructions each record counts in its SASS; tensor-core products are HMMA (mma.sync: sm_80, and
# sm_90 tiles that do not lower to wgmma) or HGMMA (wgmma, sm_90): e.g. HMMA.1688.F32.TF32; LDGDEPBAR
# closes a group of cp.async copies (a software-pipelined load: num_stages - 1 groups per loaded
# tensor in the loop's prologue, one in its body)
SASS_COUNTED = ("FMUL", "FFMA", "FADD", "MUFU.EX2", "HMMA", "HGMMA", "LDGDEPBAR")


def compile_kernel(kernel, signature, constexprs, arch, num_warps=4, num_stages=3, attrs=None):
    """Compile ``kernel`` for ``sm_<arch>``; returns the compiled kernel (``.asm`` holds ptx and cubin).

    ``attrs`` (e.g. ``{(0,): [["tt.divisibility", 16]]}``) are the alignment facts Triton's launcher
    specializes on at run time; without them the report describes scalar-load code that never runs.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


def _cuobjdump(*args):
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


def resource_usage(compiled):
    """``{"registers", "stack", "shared", "local"}`` of a compiled kernel, from ``cuobjdump -res-usage``.

    ``shared`` is the static shared memory in the cubin plus the dynamic amount Triton launches with.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = _cuobjdump("-res-usage", f.name)
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {
        "registers": int(fields["REG"]),
        "stack": int(fields["STACK"]),
        "shared": int(fields["SHARED"]) + compiled.metadata.shared,
        "local": int(fields["LOCAL"]),
    }


def sass(compiled):
    """The SASS of a compiled kernel, from ``cuobjdump --dump-sass``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return _cuobjdump("--dump-sass", f.name)


def sass_counts(code):
    """``{op: count}`` of the SASS_COUNTED instructions in ``code``."""
    return {op: len(re.findall(rf"\b{re.escape(op)}\b", code)) for op in SASS_COUNTED}


_BRANCH = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+0x([0-9a-f]+)")
_ADDRESS = re.compile(r"/\*([0-9a-f]+)\*/")


def loop_bodies(code):
    """The SASS of each loop, in order: the instructions from a branch back to an earlier address
    up to that branch (the ``BRA`` to itself after ``EXIT``, which stops a fall-through, is no loop)."""
    lines = [(int(m.group(1), 16), line) for line in code.splitlines() if (m := _ADDRESS.search(line))]
    bodies = []
    for address, line in lines:
        branch = _BRANCH.search(line)
        if branch and int(branch.group(2), 16) < address:
            start = int(branch.group(2), 16)
            bodies.append("\n".join(text for at, text in lines if start <= at <= address))
    return bodies


def report_line(name, arch, compiled):
    usage = resource_usage(compiled)
    return (
        f"{name} sm_{arch} warps={compiled.metadata.num_warps} stages={compiled.metadata.num_stages}: "
        f"{usage['registers']} registers, {usage['local']} B local (spills), {usage['stack']} B stack, "
        f"{usage['shared']} B shared"
    )


def _compile_record(spec):
    records = []
    for arch in spec.get("targets", ARCHS):
        compiled = compile_kernel(
            spec["kernel"],
            spec["signature"],
            spec["constexprs"],
            arch,
            spec["num_warps"],
            spec["num_stages"],
            spec.get("attrs"),
        )
        print(report_line(spec["name"], arch, compiled), flush=True)
        code = sass(compiled)
        records.append(
            {
                "name": spec["name"],
                "arch": arch,
                "key": spec.get("key"),
                **resource_usage(compiled),
                "wgmma_in_ptx": "wgmma" in compiled.asm["ptx"],
                "hgmma_in_sass": arch >= 90 and "HGMMA" in code,
                "sass_counts": sass_counts(code),
                "loop_sass_counts": [sass_counts(body) for body in loop_bodies(code)],
            }
        )
    return records


_specs = []  # the specs being compiled; worker processes inherit them


def _compile_index(index):
    return _compile_record(_specs[index])


def compile_module(module_name, function="aot_compile_specs", jobs=1):
    """Compile every spec ``module.function()`` lists, for the targets it names (sm_80 and sm_90
    when it names none), in ``jobs`` processes; returns one record per (spec, target).
    ``function`` may carry arguments, each a comma-separated tuple of integers: ``"f:64,128:2"``."""
    module = importlib.import_module(module_name)
    name, *args = function.split(":")  # "f:64,128:2" calls f((64, 128), (2,))
    _specs[:] = getattr(module, name)(*(tuple(int(x) for x in arg.split(",")) for arg in args))
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            per_spec = pool.map(_compile_index, range(len(_specs)), chunksize=1)
    else:
        per_spec = [_compile_index(i) for i in range(len(_specs))]
    return [record for records in per_spec for record in records]


def run_aot(module_name, function="aot_compile_specs", timeout=1200, jobs=1):
    """Run this file as a script on ``module_name.function`` in a fresh process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, __file__, module_name, function, str(jobs)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    print(proc.stdout)
    if proc.returncode != 0:
        raise AssertionError(f"ahead-of-time compile of {module_name}.{function} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    module_arg, function_arg, jobs_arg = (sys.argv[1:] + ["aot_compile_specs", "1"])[:3]
    print(json.dumps(compile_module(module_arg, function_arg, int(jobs_arg))))
