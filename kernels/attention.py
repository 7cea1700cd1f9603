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
from .attention_configs import (
    ARCH_OF_TARGET, CONFIGS, DECODE_MAX_ROWS, DECODE_TILES, DECODE_WARPS, device_limits, head_dim_padded,
    shape_constexprs, unsupported_reason,
)
from .attention_decode import DecodePlan, decode_launches, decode_plan
from .attention_forward import attention_forward_kernel, forward_args, launch_forward
from .launch import KernelLaunch, aot_spec, on_device, triton_type_name

__all__ = ["attention_backward", "attention_forward", "attention_unsupported", "aot_compile_specs"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


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
        arch, shared_limit = device_limits(q.device)
        return unsupported_reason(arch, shared_limit, head_dim_padded(head_dim), q.element_size())
    return None


def attention_forward(q, k, v, causal, scale):
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    o = torch.empty((batch, heads, seq_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    if scale < 0:  # the kernels scale a tile's max, which needs scale >= 0: q · k · scale = (-q) · k · |scale|
        q, scale = -q, -scale
    plan = decode_plan(batch, kv_heads, heads // kv_heads, seq_q, seq_k, head_dim, q)
    with on_device(q):
        if plan is not None:
            for launch in decode_launches(q, k, v, o, lse, causal, scale, plan):
                launch.run()
        else:
            launch_forward(q, k, v, o, lse, causal, scale)
    return o, lse


# ----------------------------------------------------------------------------- ahead-of-time compilation

# The launches the AOT specs describe: a GQA training step (4 query heads per kv head) and decoded
# tokens of a GQA group against a 4096-key cache split 8 ways, all contiguous.
_AOT_BATCH, _AOT_HEADS, _AOT_KV_HEADS, _AOT_SEQ = 2, 32, 8, 2048
_AOT_DECODE = dict(keys=4096, splits=8)


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _arch_of_target(target):
    """The generation whose table a compile target checks: sm_86 and sm_89 run sm_80's code."""
    return "hopper" if target >= 90 else "ampere"


def _spec(name, launch, target, key):
    return {**aot_spec(name, launch), "targets": [target], "key": key}


def _training_specs(head_dim, dtype, causal, targets):
    """Every configuration of the forward, dK/dV and dQ kernels that the autotuner of each target's
    generation can pick for these inputs; ``key`` is the configuration's resource-table key."""
    q, do, o, dq = (_meta(_AOT_BATCH, _AOT_HEADS, _AOT_SEQ, head_dim, dtype=dtype) for _ in range(4))
    k, v, dk, dv = (_meta(_AOT_BATCH, _AOT_KV_HEADS, _AOT_SEQ, head_dim, dtype=dtype) for _ in range(4))
    lse, delta = (_meta(_AOT_BATCH, _AOT_HEADS, _AOT_SEQ, dtype=torch.float32) for _ in range(2))
    scale = head_dim ** -0.5
    label = f"d={head_dim} {triton_type_name(dtype)} {'causal' if causal else 'full'}"
    tuned_kernels = (
        ("forward", attention_forward_kernel, forward_args(q, k, v, o, lse, scale)),
        ("backward_dkdv", attention_backward_dkdv_kernel, dkdv_args(q, k, v, do, lse, delta, dk, dv, scale)),
        ("backward_dq", attention_backward_dq_kernel, dq_args(q, k, v, do, lse, delta, dq, scale)),
    )
    specs = []
    for name, kernel, args in tuned_kernels:
        for target in targets:
            arch = _arch_of_target(target)
            for blocks in CONFIGS[name][arch, dtype.itemsize]:
                block_m, block_n, num_warps, num_stages = blocks
                constexprs = dict(shape_constexprs(head_dim, dtype, causal), BLOCK_M=block_m, BLOCK_N=block_n)
                specs.append(_spec(f"{name} {label} M={block_m} N={block_n} w={num_warps} s={num_stages}",
                                   KernelLaunch(kernel, None, args, constexprs, num_warps, num_stages), target,
                                   [name, arch, dtype.itemsize, head_dim_padded(head_dim), list(blocks)]))
    return specs


def _decode_specs(head_dim, dtype, causal, targets, block_m=DECODE_MAX_ROWS, combine=False):
    """The decode kernel in every key tile of DECODE_TILES, with its keys split (fp32 partials),
    ``block_m`` rows of a GQA group; with ``combine`` also the merge of the splits."""
    keys, splits = _AOT_DECODE["keys"], _AOT_DECODE["splits"]
    seq_q = max(1, block_m // 16)
    kv_heads = _AOT_HEADS * seq_q // block_m
    q, o = (_meta(_AOT_BATCH, _AOT_HEADS, seq_q, head_dim, dtype=dtype) for _ in range(2))
    k, v = (_meta(_AOT_BATCH, kv_heads, keys, head_dim, dtype=dtype) for _ in range(2))
    lse = _meta(_AOT_BATCH, _AOT_HEADS, seq_q, dtype=torch.float32)
    label = f"d={head_dim} {triton_type_name(dtype)} {'causal' if causal else 'full'}"
    specs = []
    for target in targets:
        for block_n, num_stages in DECODE_TILES[dtype.itemsize]:
            plan = DecodePlan(block_m, block_n, num_stages, splits, keys // splits)
            decode, merge = decode_launches(q, k, v, o, lse, causal, head_dim ** -0.5, plan)
            key = ["decode", _arch_of_target(target), dtype.itemsize, head_dim_padded(head_dim),
                   [block_m, block_n, DECODE_WARPS, num_stages]]
            specs.append(_spec(f"decode {label} M={block_m} N={block_n} s={num_stages}", decode, target, key))
        if combine:
            specs.append(_spec(f"decode_combine {label}", merge, target, None))
    return specs


def resource_table_specs(padded_head_dims=(16, 32, 64, 128, 256), itemsizes=(2, 4)):
    """What ``benchmarks/aot_table.py`` compiles into ``attention_resources``: every configuration
    of every tuned kernel and decode tile, for each generation's compile target, at head dims that
    need no padding, causal, fp16 standing for both 16-bit dtypes."""
    dtypes = {2: torch.float16, 4: torch.float32}
    specs = []
    for head_dim in padded_head_dims:
        for itemsize in itemsizes:
            targets = list(ARCH_OF_TARGET)
            specs += _training_specs(head_dim, dtypes[itemsize], True, targets)
            specs += _decode_specs(head_dim, dtypes[itemsize], True, targets)
    return specs


def ampere_variant_specs():
    """The largest tile of each kernel at head dim 128 (fp16, causal) for sm_86 and sm_89, to show
    they need the shared memory of sm_80's code (the table's "ampere" entries)."""
    specs = _training_specs(128, torch.float16, True, [86, 89]) + _decode_specs(128, torch.float16, True, [86, 89])
    firsts = {(s["key"][0], s["targets"][0]): s for s in reversed(specs)}  # the first spec of each kernel
    return list(firsts.values())


def aot_compile_specs():
    """What tests/test_attention_triton_aot.py compiles for sm_80 and sm_90 in CI: every
    configuration the launchers can pick for head dim 64 in fp16 without a mask and head dim 128
    in bf16 with the causal mask (the performance target), the smallest decode tile and the
    merge, and the backward preprocess."""
    specs = []
    for head_dim, dtype, causal in ((64, torch.float16, False), (128, torch.bfloat16, True)):
        o, do = (_meta(_AOT_BATCH, _AOT_HEADS, _AOT_SEQ, head_dim, dtype=dtype) for _ in range(2))
        delta = _meta(_AOT_BATCH, _AOT_HEADS, _AOT_SEQ, dtype=torch.float32)
        for target in ARCH_OF_TARGET:
            specs.append(_spec(f"backward_preprocess d={head_dim} {triton_type_name(dtype)}",
                               preprocess_launch(o, do, delta, PREPROCESS_BLOCK_M), target, None))
        specs += _training_specs(head_dim, dtype, causal, list(ARCH_OF_TARGET))
        specs += _decode_specs(head_dim, dtype, causal, list(ARCH_OF_TARGET), block_m=16, combine=True)
    return specs
