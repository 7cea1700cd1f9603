"""A kernel launch written down as data, so that the host code runs it and ``aot_compile_specs()``
compiles exactly it ahead of time (``tests/triton_aot.py``), with no GPU present.

The compile spec is specialized the way Triton's launcher specializes a real launch: tensors
become typed pointers (16-byte aligned), an integer equal to 1 becomes the constant 1 (a unit
stride: the loads vectorize), integers divisible by 16 are marked so. For a spec the tensors may
live on the ``meta`` device: only their dtype and strides matter.
"""

import contextlib
from typing import Any, NamedTuple

import torch


class KernelLaunch(NamedTuple):
    kernel: Any  # a @triton.jit function
    grid: tuple
    args: tuple  # the run-time arguments, in the kernel's order
    constexprs: dict
    num_warps: int
    num_stages: int

    def run(self):
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def on_device(t):
    """The CUDA device context of t (launches go to the right GPU); nothing under the interpreter."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _specialize(arg):
    """(signature type, attribute key) of one launch argument, as Triton's launcher computes them."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    return native_specialize_impl(CUDABackend, arg, False, True, True)


def triton_type_name(dtype):
    """Triton's name of a torch dtype ("fp16", "bf16", "fp32"), as its launcher writes it."""
    return _specialize(torch.empty(0, dtype=dtype, device="meta"))[0].removeprefix("*")


def aot_spec(name, launch):
    """The ``tests/triton_aot.py`` compile spec of ``launch`` (its grid is not needed)."""
    from triton.backends.nvidia.compiler import CUDABackend

    signature, constants, attrs = {}, dict(launch.constexprs), {}
    positional = iter(launch.args)
    for index, arg_name in enumerate(launch.kernel.arg_names):
        if arg_name in launch.constexprs:
            signature[arg_name] = "constexpr"
            continue
        kind, key = _specialize(next(positional))
        signature[arg_name] = kind
        if kind == "constexpr":
            constants[arg_name] = key
        elif key:
            attrs[(index,)] = CUDABackend.parse_attr(key)
    leftover = list(positional)
    if leftover:
        raise ValueError(f"{name}: {len(leftover)} launch arguments more than the kernel takes")
    return {"name": name, "kernel": launch.kernel, "signature": signature, "constexprs": constants, "attrs": attrs,
            "num_warps": launch.num_warps, "num_stages": launch.num_stages}
