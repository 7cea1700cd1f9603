"""What every backend agrees on, owned by none of them: the dtype rules and limits of the contract
that ``docs/architecture.md`` describes. Backends import from here, never from each other."""

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float32,) + HALF_DTYPES  # what the fast backends take; float64 is the reference's


def dtype_unsupported(*named_tensors):
    """None when every ``(name, tensor)`` (tensor may be None) has a kernel dtype, else why not."""
    for name, t in named_tensors:
        if t is not None and t.dtype not in KERNEL_DTYPES:
            return f"{name} dtype {t.dtype} is not float32, float16 or bfloat16"
    return None


def residual_stream_dtype(x_dtype, residual_in_fp32):
    """The dtype of h = x + residual: float32 when asked for and x is half precision, else x's dtype."""
    return torch.float32 if residual_in_fp32 and x_dtype in HALF_DTYPES else x_dtype
