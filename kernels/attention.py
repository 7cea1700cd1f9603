"""Fused causal attention in Triton, FlashAttention-2 style: the op's host entry points.

The kernels live by pass: ``attention_forward`` (the online-softmax forward),
``attention_decode`` (a few queries against a long KV cache, keys split across the GPU), and
``attention_backward`` (delta preprocess, dK/dV and dQ kernels); ``attention_configs`` holds the
tiles the autotuner may pick and the ``Variant`` the launchers specialize on, and ``tiles`` the
tile loads and stores both Triton ops share.

The causal mask is aligned bottom-right (query ``i`` sees keys ``j <= i + seq_k - seq_q``); rows
that see no key output zeros with ``lse = -inf`` and contribute no gradient. The variants of the
contract (``docs/architecture.md``) are compile-time specializations of the same kernels: a sliding
window (only the key tiles inside it are visited), a soft cap, and packed sequences (one launch,
each program reading its sequence's offsets). Head dims that are not a power of two are padded
inside the kernels with masked loads. Every tensor is addressed through all four of its strides,
so any layout works without a copy.
"""

import torch

from . import device_unsupported_reason, interpreting
from .attention_backward import (
    PREPROCESS_BLOCK_M, attention_backward_dkdv_kernel, attention_backward_dq_kernel, dkdv_args, dq_args,
    launch_backward, preprocess_launch,
)
from .attention_configs import (
    ARCH_OF_TARGET, CONFIGS, DECODE_TILES, DECODE_WARPS, SHARED_MEMORY_LIMITS, VARIANT_HEAD_DIMS, VARIANT_NAMES,
    Variant, decode_blocks, decode_max_rows, decode_tile, device_limits, head_dim_padded, select_blocks,
    shape_constexprs, unsupported_reason,
)
from .attention_variant_resources import VARIANT_STACK
from .attention_decode import DecodePlan, decode_launches, decode_plan
from .attention_forward import attention_forward_kernel, forward_args, launch_forward
from .launch import KernelLaunch, aot_spec, on_device, triton_type_name

__all__ = [
    "attention_backward", "attention_forward", "attention_unsupported", "varlen_attention_backward",
    "varlen_attention_forward", "aot_compile_specs",
]

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


def _scores_scale(q, scale):
    """(q, scale) with the same scores and scale > 0, as the forward kernels need: a negative scale
    moves its sign into q (q · k · scale = (-q) · k · |scale|); a zero one keeps q · 0 (0, or NaN
    where an inf or NaN is in q or meets one in k, as q · k · 0 gives) with scale 1."""
    if scale < 0:
        return -q, -scale
    if scale == 0:
        return q * 0, 1.0
    return q, scale


def attention_forward(q, k, v, causal, scale, *, window=None, softcap=0.0):
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    variant = Variant(causal, window, softcap)
    o = torch.empty((batch, heads, seq_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    q, scale = _scores_scale(q, scale)
    # keys before the first query's window are seen by no query: decoding drops them before it
    # splits the keys across programs, so the splits share the window rather than the whole cache
    # (the mask is relative to the last key, so it is unchanged; 16 rows keep the view's alignment)
    unseen = 0 if window is None or window[0] < 0 else max(seq_k - seq_q - window[0], 0) // 16 * 16
    plan = decode_plan(batch, kv_heads, heads // kv_heads, seq_q, seq_k - unseen, head_dim, q, variant.combination())
    with on_device(q):
        if plan is not None:
            k, v = k[:, :, unseen:], v[:, :, unseen:]
            for launch in decode_launches(q, k, v, o, lse, scale, variant, plan):
                launch.run()
        else:
            launch_forward(q, k, v, o, lse, scale, variant)
    return o, lse


def attention_backward(do, q, k, v, o, lse, causal, scale, *, window=None, softcap=0.0):
    dq, dk, dv = torch.empty_like(q, memory_format=torch.contiguous_format), *(
        torch.empty_like(t, memory_format=torch.contiguous_format) for t in (k, v))
    with on_device(q):
        launch_backward(do, q, k, v, o, lse, dq, dk, dv, scale, Variant(causal, window, softcap))
    return dq, dk, dv


def _heads_major(t):
    """A packed (total, heads, ...) tensor as the (1, heads, total, ...) view the kernels address."""
    return t.transpose(0, 1).unsqueeze(0)


def varlen_attention_forward(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, *, window=None, softcap=0.0
):
    """Packed sequences in one launch: a program per (query block of the longest sequence, sequence ·
    head) reads its sequence's offsets and returns at once when the sequence is shorter."""
    total_q, heads, head_dim = q.shape
    variant = Variant(causal, window, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    o = torch.empty((total_q, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    q, scale = _scores_scale(q, scale)
    if total_q and max_seqlen_q:
        with on_device(q):
            launch_forward(_heads_major(q), _heads_major(k), _heads_major(v), _heads_major(o), lse.unsqueeze(0),
                           scale, variant)
    return o, lse


def varlen_attention_backward(
    do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, *, window=None,
    softcap=0.0,
):
    variant = Variant(causal, window, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if max_seqlen_k == 0 or max_seqlen_q == 0:  # no query sees a key: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    with on_device(q):
        launch_backward(*(_heads_major(t) for t in (do, q, k, v, o)), lse.unsqueeze(0),
                        *(_heads_major(t) for t in (dq, dk, dv)), scale, variant)
    return dq, dk, dv


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


def _label(head_dim, dtype, variant):
    options = [name for name, used in (("window", variant.window is not None), ("softcap", variant.softcap > 0),
                                       ("varlen", variant.varlen)) if used]
    return " ".join([f"d={head_dim}", triton_type_name(dtype), "causal" if variant.causal else "full", *options])


def _training_specs(head_dim, dtype, variant, targets, only=None):
    """Every configuration of the forward, dK/dV and dQ kernels that the autotuner of each target's
    generation can pick for these inputs (``only(kernel, arch)``: those of them it returns); ``key``
    is the configuration's resource-table key. A packed ``variant`` describes _AOT_BATCH sequences
    of at most _AOT_SEQ tokens."""
    shapes = {"q": (_AOT_BATCH, _AOT_HEADS, _AOT_SEQ), "k": (_AOT_BATCH, _AOT_KV_HEADS, _AOT_SEQ)}
    if variant.varlen:  # (1, heads, total, head_dim) views of packed tensors, as the launchers pass them
        shapes = {name: (1, heads, batch * seq) for name, (batch, heads, seq) in shapes.items()}
    q, do, o, dq = (_meta(*shapes["q"], head_dim, dtype=dtype) for _ in range(4))
    k, v, dk, dv = (_meta(*shapes["k"], head_dim, dtype=dtype) for _ in range(4))
    lse, delta = (_meta(*shapes["q"], dtype=torch.float32) for _ in range(2))
    scale = head_dim ** -0.5
    label = _label(head_dim, dtype, variant)
    tuned_kernels = (
        ("forward", attention_forward_kernel, forward_args(q, k, v, o, lse, scale, variant)),
        ("backward_dkdv", attention_backward_dkdv_kernel, dkdv_args(q, k, v, do, lse, delta, dk, dv, scale, variant)),
        ("backward_dq", attention_backward_dq_kernel, dq_args(q, k, v, do, lse, delta, dq, scale, variant)),
    )
    specs = []
    for name, kernel, args in tuned_kernels:
        for target in targets:
            arch = _arch_of_target(target)
            for blocks in CONFIGS[name][arch, dtype.itemsize]:
                if only is not None and blocks not in only(name, arch):
                    continue
                block_m, block_n, num_warps, num_stages = blocks
                constexprs = dict(shape_constexprs(head_dim, dtype, variant), BLOCK_M=block_m, BLOCK_N=block_n)
                specs.append(_spec(f"{name} {label} M={block_m} N={block_n} w={num_warps} s={num_stages}",
                                   KernelLaunch(kernel, None, args, constexprs, num_warps, num_stages), target,
                                   [name, arch, dtype.itemsize, head_dim_padded(head_dim), list(blocks)]))
    return specs


def _decode_specs(head_dim, dtype, variant, targets, block_m=None, combine=False, tiles=None):
    """The decode kernel in every key tile of DECODE_TILES (or ``tiles``), with its keys split (fp32
    partials), ``block_m`` rows of a GQA group (default: the most it takes, ``decode_max_rows``);
    with ``combine`` also the merge of the splits."""
    block_m = block_m or decode_max_rows(dtype.itemsize, head_dim_padded(head_dim))
    keys, splits = _AOT_DECODE["keys"], _AOT_DECODE["splits"]
    seq_q = max(1, block_m // 16)
    kv_heads = _AOT_HEADS * seq_q // block_m
    q, o = (_meta(_AOT_BATCH, _AOT_HEADS, seq_q, head_dim, dtype=dtype) for _ in range(2))
    k, v = (_meta(_AOT_BATCH, kv_heads, keys, head_dim, dtype=dtype) for _ in range(2))
    lse = _meta(_AOT_BATCH, _AOT_HEADS, seq_q, dtype=torch.float32)
    label = _label(head_dim, dtype, variant)
    specs = []
    for target in targets:
        for block_n, num_stages in tiles or DECODE_TILES[dtype.itemsize]:
            plan = DecodePlan(block_m, block_n, num_stages, splits, keys // splits)
            decode, merge = decode_launches(q, k, v, o, lse, head_dim ** -0.5, variant, plan)
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
            specs += _training_specs(head_dim, dtypes[itemsize], CAUSAL, targets)
            specs += _decode_specs(head_dim, dtypes[itemsize], CAUSAL, targets)
    return specs


def ampere_variant_specs():
    """The largest tile of each kernel at head dim 128 (fp16, causal) for sm_86 and sm_89, to show
    they need the shared memory of sm_80's code (the table's "ampere" entries)."""
    specs = _training_specs(128, torch.float16, CAUSAL, [86, 89]) + _decode_specs(128, torch.float16, CAUSAL, [86, 89])
    firsts = {(s["key"][0], s["targets"][0]): s for s in reversed(specs)}  # the first spec of each kernel
    return list(firsts.values())


CAUSAL = Variant(causal=True)


def _variant(causal, names):
    """A call of the specialization ``causal`` with ``names`` (of VARIANT_NAMES): a 512-key window
    (64 to the right without the mask), a soft cap of 50, _AOT_BATCH packed sequences of at most
    _AOT_SEQ tokens. The values are run-time arguments: only which options are on is compiled in."""
    packed = dict(cu_seqlens_q=_meta(_AOT_BATCH + 1, dtype=torch.int32),
                  cu_seqlens_k=_meta(_AOT_BATCH + 1, dtype=torch.int32), max_seqlen_q=_AOT_SEQ, max_seqlen_k=_AOT_SEQ)
    return Variant(causal, window=((512, 0) if causal else (512, 64)) if "window" in names else None,
                   softcap=50.0 if "softcap" in names else 0.0, **(packed if "varlen" in names else {}))


# The specializations attention_variant_resources lists (14): causal or not, with every non-empty
# set of a window, a soft cap and packed sequences, by their ``combination`` names.
_OPTION_SETS = [[n for i, n in enumerate(VARIANT_NAMES) if mask >> i & 1] for mask in range(1, 2 ** len(VARIANT_NAMES))]
VARIANT_CALLS = {variant.combination(): variant
                 for causal in (True, False) for variant in (_variant(causal, names) for names in _OPTION_SETS)}
VARIANT_DTYPES = {2: torch.bfloat16, 4: torch.float32}  # the table's dtype per element size (fp16 compiles as bf16)


def _parts_of(arch):
    return [part for part in SHARED_MEMORY_LIMITS if _arch_of_target(int(part.removeprefix("sm_"))) == arch]


def variant_offered(kernel, arch, itemsize, padded_head_dim, combo):
    """The configurations of ``kernel`` a call of the specialization ``combo`` can be offered (the
    autotuned kernels at long sequences, the decode tile) on any part of generation ``arch``."""
    offered = []
    for part in _parts_of(arch):
        limit = SHARED_MEMORY_LIMITS[part]
        if kernel == "decode":
            tile = decode_tile(arch, limit, padded_head_dim, itemsize, combo)
            offered += [decode_blocks(itemsize, padded_head_dim, *tile)] if tile else []
        else:
            offered += select_blocks(kernel, arch, limit, padded_head_dim, itemsize, _AOT_SEQ, _AOT_SEQ, combo)
    return list(dict.fromkeys(offered))


def _variant_specs(wanted, head_dims=VARIANT_HEAD_DIMS):
    """Specs of the variant-table configurations ``wanted(kernel, arch, itemsize, padded head dim,
    combo)`` lists, for every combination at ``head_dims`` ({bytes per element: padded head dims});
    each key is the table's key."""
    specs = []
    for itemsize, dims in head_dims.items():
        dtype = VARIANT_DTYPES[itemsize]
        for head_dim in dims:
            for combo, variant in VARIANT_CALLS.items():
                kernel_specs = _training_specs(
                    head_dim, dtype, variant, list(ARCH_OF_TARGET),
                    only=lambda kernel, arch: wanted(kernel, arch, itemsize, head_dim, combo))
                for target, arch in ([] if variant.varlen else ARCH_OF_TARGET.items()):  # decode takes no packed inputs
                    tiles = [(b[1], b[3]) for b in wanted("decode", arch, itemsize, head_dim, combo)]
                    kernel_specs += _decode_specs(head_dim, dtype, variant, [target], tiles=tiles) if tiles else []
                for spec in kernel_specs:
                    spec["key"] = [*spec["key"], combo]
                specs += kernel_specs
    return specs


def _head_dims(itemsizes, padded_head_dims):
    """{bytes per element: padded head dims} of the table's coverage, restricted to these."""
    return {itemsize: [d for d in VARIANT_HEAD_DIMS[itemsize] if d in padded_head_dims] for itemsize in itemsizes}


def variant_sweep_specs(itemsizes=tuple(VARIANT_HEAD_DIMS), padded_head_dims=(16, 32, 64, 128)):
    """What ``benchmarks/aot_table.py --variants`` compiles next: the configurations a variant call
    can be offered that attention_variant_resources does not list yet (the script repeats until
    none is left, since a spilling tile makes the selection offer others)."""
    return _variant_specs(lambda kernel, arch, itemsize, padded, combo: [
        b for b in variant_offered(kernel, arch, itemsize, padded, combo)
        if (kernel, arch, itemsize, padded, b, combo) not in VARIANT_STACK], _head_dims(itemsizes, padded_head_dims))


def variant_table_specs():
    """Every configuration attention_variant_resources lists, to recompile the whole table."""
    return _variant_specs(lambda kernel, arch, itemsize, padded, combo: [
        blocks for (*table_call, blocks, table_combo) in VARIANT_STACK
        if table_call == [kernel, arch, itemsize, padded] and table_combo == combo])


# The fp32 combinations CI's sample compiles (all 14: 82 compiles more, over a minute): every option
# on, with and without the mask, which between them take every kernel, the decode included.
FP32_SAMPLE_COMBINATIONS = ("causal+window+softcap+varlen", "window+softcap")


def variant_sample_specs():
    """What CI compiles of the variant table: at head dim 128, for sm_80 and sm_90, every
    combination in bf16 and FP32_SAMPLE_COMBINATIONS in fp32, in the first configuration of each
    kernel it can be offered (the largest tile: the most registers)."""
    def first_offered(kernel, arch, itemsize, padded, combo):
        if itemsize == 4 and combo not in FP32_SAMPLE_COMBINATIONS:
            return []
        return variant_offered(kernel, arch, itemsize, padded, combo)[:1]

    return _variant_specs(first_offered, head_dims={itemsize: (128,) for itemsize in VARIANT_HEAD_DIMS})


def aot_compile_specs():
    """What tests/test_attention_triton_aot.py compiles for sm_80 and sm_90 in CI: every
    configuration the launchers can pick for head dim 64 in fp16 without a mask and head dim 128
    in bf16 with the causal mask (the performance target), the smallest decode tile and the
    merge, and the backward preprocess (the variants: ``variant_sample_specs``)."""
    specs = []
    for head_dim, dtype, variant in ((64, torch.float16, Variant(causal=False)), (128, torch.bfloat16, CAUSAL)):
        o, do = (_meta(_AOT_BATCH, _AOT_HEADS, _AOT_SEQ, head_dim, dtype=dtype) for _ in range(2))
        delta = _meta(_AOT_BATCH, _AOT_HEADS, _AOT_SEQ, dtype=torch.float32)
        for target in ARCH_OF_TARGET:
            specs.append(_spec(f"backward_preprocess d={head_dim} {triton_type_name(dtype)}",
                               preprocess_launch(o, do, delta, PREPROCESS_BLOCK_M), target, None))
        specs += _training_specs(head_dim, dtype, variant, list(ARCH_OF_TARGET))
        specs += _decode_specs(head_dim, dtype, variant, list(ARCH_OF_TARGET), block_m=16, combine=True)
    return specs
