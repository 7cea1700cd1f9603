"""Triton kernels, installed as ``fastgpt.kernels``: one module per op.

Triton runs on CUDA GPUs, and on the CPU only through its interpreter
(``TRITON_INTERPRET=1``, set before triton is imported), which the test suite uses.
"""

import functools
import os


def interpreting():
    """True when Triton runs kernels in its CPU interpreter instead of compiling them."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache  # asked on every op call: the device name query alone costs microseconds
def available():
    """(available, reason) for the triton backend as a whole."""
    try:
        import triton
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    import torch

    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    if interpreting():
        return True, f"triton {triton.__version__} in the CPU interpreter (TRITON_INTERPRET=1; slow, for tests)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"


def device_unsupported_reason(*tensors):
    """None when Triton can run on these tensors' device here, else why not."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        return f"tensors on {t.device.type} need a CUDA device (or TRITON_INTERPRET=1 for the CPU)"
    return None
