"""Fused causal attention in Triton, FlashAttention-2 style: the op's host entry points.

The kernels live by pass: ``attention_forward`` (the online-softmax forward),
``attention_decode`` (a few queries against a long KV cache, keys split across the GPU), and
``attention_backward`` (delta preprocess, dK/dV and dQ kernels); ``attention_configs`` holds the
tiles the autotuner may pick and ``tiles`` the tile loads and stores both Triton ops share.

The causal mask is aligned bottom-right (query ``i`` sees keys ``j <= i + seq_k - seq_q``); rows
that see no key output zeros with ``lse = -inf`` and contribute no gradient. Head dims that are
not a power of two are padded inside the kernels with masked loads. Every tensor is addressed
through all four of its strides, so any layout works without a copy.
"""

import torch

from . import device_unsupported_reason, interpreting
from .attention_backward import (
    PREPROCESS_BLOCK_M, attention_backward, attention_backward_dkdv_kernel, attention_backward_dq_kernel, dkdv_args,
    dq_args, preprocess_launch,
)
from .attention_configs import DKDV_CONFIGS, DQ_CONFIGS, FORWARD_CONFIGS, all_blocks, head_dim_padded, shape_constexprs
from .attention_decode import DecodePlan, decode_launches, decode_plan, decode_tiles
from .attention_forward import attention_forward_kernel, forward_args, launch_forward
from .launch import KernelLaunch, aot_spec, on_device, triton_type_name

__all__ = ["attention_backward", "attention_forward", "attention_unsupported", "aot_compile_specs"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256

_decode_plan = decode_plan  # tests/test_attention.py checks the plan under this name


def attention_unsupported(q, k, v):
    """None when these kernels can run on q, k, v here, else why not."""
    reason = device_unsupported_reason(q, k, v)
    if reason is not None:
        return reason
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float32, float16 or bfloat16)"
    if q.dtype == torch.bfloat16 and interpreting():
        return "bfloat16 dot products are wrong in Triton's CPU interpreter (errors near 1e9); use a GPU"
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"head_dim {head_dim} is outside 1..{MAX_HEAD_DIM}"
    if q.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(q.device)
        if major < 8 and q.dtype == torch.bfloat16:
            return f"bfloat16 needs compute capability 8.0 or newer, this GPU has {major}.{minor}"
    return None


def attention_forward(q, k, v, causal, scale):
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    o = torch.empty((batch, heads, seq_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    plan = decode_plan(batch, kv_heads, heads // kv_heads, seq_q, seq_k, head_dim, q)
    with on_device(q):
        if plan is not None:
            for launch in decode_launches(q, k, v, o, lse, causal, scale, plan):
                launch.run()
        else:
            launch_forward(q, k, v, o, lse, causal, scale)
    return o, lse


# ----------------------------------------------------------------------------- ahead-of-time compilation

# The launches the AOT specs describe: a GQA training step (4 query heads per kv head) and one
# decoded token of 8 heads per kv head against a 4096-key cache split 8 ways, all contiguous.
_AOT_BATCH, _AOT_HEADS, _AOT_KV_HEADS, _AOT_SEQ = 2, 32, 8, 2048
_AOT_DECODE = dict(kv_heads=4, keys=4096, splits=8)


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _training_specs(label, head_dim, dtype, causal):
    """The preprocess and every configuration of the forward, dK/dV and dQ kernels that either
    generation's autotuner can pick; a name lists the generations whose autotuner can pick it."""
    q, do, o, dq = (_meta(_AOT_BATCH, _AOT_HEADS, _AOT_SEQ, head_dim, dtype=dtype) for _ in range(4))
    k, v, dk, dv = (_meta(_AOT_BATCH, _AOT_KV_HEADS, _AOT_SEQ, head_dim, dtype=dtype) for _ in range(4))
    lse, delta = (_meta(_AOT_BATCH, _AOT_HEADS, _AOT_SEQ, dtype=torch.float32) for _ in range(2))
    scale = head_dim ** -0.5
    specs = [aot_spec(f"backward_preprocess {label}", preprocess_launch(o, do, delta, PREPROCESS_BLOCK_M))]
    tuned_kernels = (
        ("forward", attention_forward_kernel, FORWARD_CONFIGS, forward_args(q, k, v, o, lse, scale)),
        ("backward_dkdv", attention_backward_dkdv_kernel, DKDV_CONFIGS,
         dkdv_args(q, k, v, do, lse, delta, dk, dv, scale)),
        ("backward_dq", attention_backward_dq_kernel, DQ_CONFIGS, dq_args(q, k, v, do, lse, delta, dq, scale)),
    )
    for name, kernel, configs_by_arch, args in tuned_kernels:
        for blocks in all_blocks(configs_by_arch):
            block_m, block_n, num_warps, num_stages = blocks
            archs = ",".join(arch for arch, listed in configs_by_arch.items() if blocks in listed)
            constexprs = dict(shape_constexprs(head_dim, dtype, causal), BLOCK_M=block_m, BLOCK_N=block_n)
            specs.append(aot_spec(f"{name} {label} M={block_m} N={block_n} [{archs}]",
                                  KernelLaunch(kernel, None, args, constexprs, num_warps, num_stages)))
    return specs


def _decode_specs(label, head_dim, dtype, causal):
    """The decode kernel with its keys split (fp32 partials) and the merge of the splits."""
    kv_heads, keys, splits = _AOT_DECODE["kv_heads"], _AOT_DECODE["keys"], _AOT_DECODE["splits"]
    q, o = (_meta(_AOT_BATCH, _AOT_HEADS, 1, head_dim, dtype=dtype) for _ in range(2))
    k, v = (_meta(_AOT_BATCH, kv_heads, keys, head_dim, dtype=dtype) for _ in range(2))
    lse = _meta(_AOT_BATCH, _AOT_HEADS, 1, dtype=torch.float32)
    block_n, num_stages = decode_tiles(head_dim_padded(head_dim), dtype.itemsize)
    block_m = max(16, _AOT_HEADS // kv_heads)
    plan = DecodePlan(block_m, block_n, num_stages, splits, keys // splits)
    decode, combine = decode_launches(q, k, v, o, lse, causal, head_dim ** -0.5, plan)
    return [aot_spec(f"decode {label} M={block_m} N={block_n} [hopper,ampere]", decode),
            aot_spec(f"decode_combine {label} [hopper,ampere]", combine)]


def aot_compile_specs():
    """What tests/triton_aot.py compiles for sm_80 and sm_90: every kernel configuration the
    launchers can pick for head dim 64 in fp16 without a mask and head dim 128 in bf16 with the
    causal mask (the performance target)."""
    specs = []
    for head_dim, dtype, causal in ((64, torch.float16, False), (128, torch.bfloat16, True)):
        label = f"d={head_dim} {triton_type_name(dtype)} {'causal' if causal else 'full'}"
        specs += _training_specs(label, head_dim, dtype, causal)
        specs += _decode_specs(label, head_dim, dtype, causal)
    return specs
