"""Fused residual add + LayerNorm / RMSNorm in Triton: the op's host entry points.

The kernels live by pass: ``add_layer_norm_forward`` (h = x + residual and y in one read) and
``add_layer_norm_backward`` (dx, and dweight/dbias from deterministic fp32 partial sums);
``add_layer_norm_configs`` decides tiles, warps and programs, and ``tiles`` holds the tile loads
both Triton ops share.
"""

import torch

from . import device_unsupported_reason
from .add_layer_norm_backward import add_layer_norm_backward, backward_launches
from .add_layer_norm_configs import PROGRAMS_PER_SM
from .add_layer_norm_forward import add_layer_norm_forward, forward_launch
from .launch import aot_spec

__all__ = ["add_layer_norm_backward", "add_layer_norm_forward", "add_layer_norm_unsupported", "aot_compile_specs"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HIDDEN = 65536  # the widest row tested; wider works the same way (column loops) but is untested


def add_layer_norm_unsupported(x, residual, weight, bias):
    reason = device_unsupported_reason(x, residual, weight, bias)
    if reason is not None:
        return reason
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has dtype {t.dtype}; the triton kernels take float32, float16 and bfloat16"
    if x.shape[-1] > MAX_HIDDEN:
        return f"hidden size {x.shape[-1]} exceeds the triton kernels' maximum of {MAX_HIDDEN}"
    return None


# ----------------------------------------------------------------------------- ahead-of-time compilation

_AOT_HIDDEN_SIZES = (768, 1024, 4096, 8192, 16384)
_AOT_ROWS = 8192  # enough rows that the narrow-row packing reaches its full tile
_AOT_PROGRAMS_TARGET = PROGRAMS_PER_SM * 132  # H100 SXM


def aot_compile_specs():
    """The forward and backward kernels in the configurations the launch heuristics pick for
    hidden sizes 768..16384: LayerNorm in bf16 and fp32 with weight and bias and a gradient into h,
    and RMSNorm in bf16 with weight and a float32 residual stream."""
    f32, bf16 = torch.float32, torch.bfloat16
    variants = (  # name, x dtype, residual in fp32, is_rms_norm, has_bias
        ("layernorm_bf16", bf16, False, False, True),
        ("layernorm_fp32", f32, False, False, True),
        ("rmsnorm_bf16_residual_fp32", bf16, True, True, False),
    )
    specs = []
    for N in _AOT_HIDDEN_SIZES:
        for variant, x_dtype, residual_in_fp32, rms, has_bias in variants:
            x = torch.empty((_AOT_ROWS, N), dtype=x_dtype, device="meta")
            residual = torch.empty((_AOT_ROWS, N), dtype=f32 if residual_in_fp32 else x_dtype, device="meta")
            weight = torch.empty(N, dtype=x_dtype, device="meta")
            bias = weight if has_bias else None
            (_, h, mean, rstd), forward = forward_launch(x, residual, weight, bias, 1e-5, rms, residual_in_fp32)
            specs.append(aot_spec(f"forward_{variant}_N{N}", forward))
            _, launches = backward_launches(x, h, h, weight, bias, mean, rstd, rms, _AOT_PROGRAMS_TARGET)
            if len(launches) == 2:
                specs.append(aot_spec(f"row_dots_{variant}_N{N}", launches[0]))
            specs.append(aot_spec(f"backward_{variant}_N{N}", launches[-1]))
    return specs
