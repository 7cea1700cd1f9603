"""What every backend agrees on, owned by none of them: the dtype rules and limits of the contract
that ``docs/architecture.md`` describes. Backends import from here, never from each other."""

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def residual_stream_dtype(x_dtype, residual_in_fp32):
    """The dtype of h = x + residual: float32 when asked for and x is half precision, else x's dtype."""
    return torch.float32 if residual_in_fp32 and x_dtype in HALF_DTYPES else x_dtype
