"""The Triton attention forward for a few queries against a long key sequence, as when generating
against a KV cache (flash-decoding): one program per (key split, batch, kv head) whose tile rows
are every query of every head in the GQA group, so each K/V tile is read once per group; the keys
are split so the programs fill the GPU, and a second kernel merges the splits by their
log-sum-exp."""

import collections

import torch
import triton
import triton.language as tl

from . import interpreting
from .attention_configs import (
    DECODE_WARPS, INTERPRETER_BLOCKS, decode_max_rows, decode_tile, device_limits, head_dim_padded, shape_constexprs,
    strides,
)
from .attention_forward import LN2, LOG2E, forward_visible_tiles, key_range, normalized_rows, window_edges
from .launch import KernelLaunch

# At most this many queries, and queries × GQA group size rows (decode_max_rows), go to the decode
# kernel; keys are split at most DECODE_MAX_SPLITS ways, and the merge sums DECODE_COMBINE_SPLITS
# splits of a row at a time (a (splits, head_dim) fp32 tile per step stays small in registers).
DECODE_MAX_QUERIES = 4
DECODE_MAX_SPLITS = 128
DECODE_COMBINE_SPLITS = 16
DECODE_COMBINE_WARPS = 4
DecodePlan = collections.namedtuple("DecodePlan", "block_m block_n num_stages splits keys_per_split")


@triton.jit
def attention_decode_kernel(
    q_ptr,  # (batch, heads, seq_q, head_dim), any strides
    k_ptr,  # (batch, kv_heads, seq_k, head_dim), any strides
    v_ptr,  # (batch, kv_heads, seq_k, head_dim), any strides
    out_ptr,  # FINAL: o (batch, heads, seq_q, head_dim); else fp32 (splits, batch·heads·seq_q, HEAD_DIM_PADDED)
    lse_out_ptr,  # FINAL: lse (batch, heads, seq_q), natural log; else fp32 (splits, batch·heads·seq_q), log2 domain
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,  # of o when FINAL
    heads, kv_heads, group_size, seq_q, seq_k, scale, keys_per_split, rows,  # rows = batch·heads·seq_q
    window_left, window_right, softcap,  # used only under WINDOW / SOFTCAP; window sides >= 0
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FINAL: tl.constexpr,
):
    """A few queries against a long key sequence: one program per (key split, batch, kv head).
    Its BLOCK_M rows are every query of every head in the GQA group, so each K/V tile is loaded
    once for the whole group; the key splits fill the GPU when batch · kv_heads alone cannot."""
    split = tl.program_id(0)
    batch_kv_head = tl.program_id(1)
    batch = (batch_kv_head // kv_heads).to(tl.int64)
    kv_head = batch_kv_head % kv_heads
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PADDED

    packed = tl.arange(0, BLOCK_M)  # row = head_in_group * seq_q + query
    is_row = packed < group_size * seq_q
    head = (kv_head * group_size + packed // seq_q).to(tl.int64)
    query = packed % seq_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    q = tl.load(q_ptr + batch * stride_qb + head[:, None] * stride_qh + query[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=is_row[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = k_ptr + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head.to(tl.int64) * stride_vh

    # this split's keys that some query of the tile may see
    right_edge, left_edge = window_edges(seq_k - seq_q, window_left, window_right, CAUSAL, WINDOW)
    lo, hi = key_range(0, seq_q - 1, seq_k, right_edge, left_edge, BLOCK_N, CAUSAL, WINDOW)
    split_start = split * keys_per_split
    start_n = tl.maximum(split_start, lo)
    end_n = tl.minimum(split_start + keys_per_split, hi)

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, row_max, row_sum = forward_visible_tiles(
        acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        query, 0, seq_q - 1, offs_n, offs_d, seq_k, right_edge, left_edge, scale * LOG2E, softcap, start_n, end_n,
        HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, PAD_D, DOT_PRECISION,
    )

    out, lse2 = normalized_rows(acc, row_max, row_sum)
    flat_row = (batch * heads + head) * seq_q + query  # row of (batch, heads, seq_q) flattened
    if FINAL:
        tl.store(lse_out_ptr + flat_row, lse2 * LN2, mask=is_row)
        o_ptrs = (out_ptr + batch * stride_ob + head[:, None] * stride_oh + query[:, None] * stride_om
                  + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=is_row[:, None] & (offs_d[None, :] < HEAD_DIM))
    else:
        part_row = split * rows + flat_row
        tl.store(lse_out_ptr + part_row, lse2, mask=is_row)
        tl.store(out_ptr + part_row[:, None] * HEAD_DIM_PADDED + offs_d[None, :], out, mask=is_row[:, None])


@triton.jit
def attention_decode_combine_kernel(
    part_o_ptr,  # fp32 (splits, rows, HEAD_DIM_PADDED): each split's normalized output
    part_lse_ptr,  # fp32 (splits, rows): each split's log-sum-exp, log2 domain, -inf where it saw no key
    o_ptr,  # (batch, heads, seq_q, head_dim) output
    lse_ptr,  # (batch, heads, seq_q) fp32 output, contiguous
    stride_ob, stride_oh, stride_om, stride_od,
    heads, seq_q, rows, splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    """Merge the splits of one row by their log-sum-exp: one program per row, the splits' weights
    from one max over all of them, their outputs summed SPLIT_CHUNK at a time in split order (the
    same order on every run: deterministic)."""
    flat_row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    lse2 = tl.load(part_lse_ptr + offs_s * rows + flat_row, mask=offs_s < splits, other=float("-inf"))
    total_max = tl.max(lse2, 0)
    shift = tl.where(total_max == float("-inf"), 0.0, total_max)  # no split saw a key: weights 0, not NaN
    total_sum = tl.sum(tl.math.exp2(lse2 - shift), 0)
    offs_c = tl.arange(0, SPLIT_CHUNK)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    acc = tl.zeros([HEAD_DIM_PADDED], dtype=tl.float32)
    for chunk in range(0, splits, SPLIT_CHUNK):
        split = chunk + offs_c
        part_row = split * rows + flat_row
        weight = tl.math.exp2(tl.load(part_lse_ptr + part_row, mask=split < splits, other=float("-inf")) - shift)
        part = tl.load(part_o_ptr + part_row[:, None] * HEAD_DIM_PADDED + offs_d[None, :],
                       mask=split[:, None] < splits, other=0.0)
        acc += tl.sum(part * weight[:, None], 0)
    sees_keys = total_sum > 0.0
    out = acc / tl.where(sees_keys, total_sum, 1.0)
    tl.store(lse_ptr + flat_row, tl.where(sees_keys, total_max + tl.math.log2(total_sum), float("-inf")) * LN2)
    batch_head = flat_row // seq_q
    o_ptrs = (o_ptr + (batch_head // heads) * stride_ob + (batch_head % heads) * stride_oh
              + (flat_row % seq_q) * stride_om + offs_d * stride_od)
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def decode_plan(batch, kv_heads, group_size, seq_q, seq_k, head_dim, q, combo=""):
    """``DecodePlan`` when the queries are few enough for the decode kernel (every query of a GQA
    group in one tile of at most ``decode_max_rows`` rows: 64, 16 in fp32 at head dim 128), else
    None. Keys are split so that batch · kv_heads · splits programs fill the GPU, each split at
    least two key tiles long; the key tile is the one clean for the call's specialization ``combo``
    (``decode_tile``). The interpreter routes alike, so the CPU tests take the same kernel."""
    rows = group_size * seq_q
    if seq_q > DECODE_MAX_QUERIES or rows > decode_max_rows(q.element_size(), head_dim_padded(head_dim)):
        return None
    if interpreting():
        block_n, wanted_splits, num_stages = INTERPRETER_BLOCKS["BLOCK_N"], 4, 1
    else:
        tile = decode_tile(*device_limits(q.device), head_dim_padded(head_dim), q.element_size(), combo)
        if tile is None:  # attention_unsupported declines these inputs first
            raise ValueError(f"no decode tile fits this GPU's shared memory at head_dim {head_dim}, {q.dtype}")
        block_n, num_stages = tile
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        wanted_splits = triton.cdiv(2 * sms, batch * kv_heads)
    splits = max(1, min(wanted_splits, triton.cdiv(seq_k, 2 * block_n), DECODE_MAX_SPLITS))
    keys_per_split = triton.cdiv(triton.cdiv(seq_k, splits), block_n) * block_n
    return DecodePlan(
        block_m=max(16, triton.next_power_of_2(rows)), block_n=block_n, num_stages=num_stages,
        splits=triton.cdiv(seq_k, keys_per_split), keys_per_split=keys_per_split,
    )


def decode_launches(q, k, v, o, lse, scale, variant, plan):
    """Flash-decoding: each key split writes its normalized partial output and log-sum-exp, and a
    second kernel merges them; with a single split the first kernel writes o and lse itself. The
    ``variant`` may have a window and a soft cap, not packed sequences."""
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    rows = batch * heads * seq_q
    padded = head_dim_padded(head_dim)
    final = plan.splits == 1
    dense_constexprs = shape_constexprs(head_dim, q.dtype, variant)
    if dense_constexprs.pop("VARLEN"):
        raise ValueError("the decode kernel takes (batch, heads, seq, head_dim) tensors, not packed sequences")
    if final:
        out, lse_out = o, lse
    else:
        out = torch.empty((plan.splits, rows, padded), dtype=torch.float32, device=q.device)
        lse_out = torch.empty((plan.splits, rows), dtype=torch.float32, device=q.device)
    decode = KernelLaunch(
        attention_decode_kernel,
        (plan.splits, batch * kv_heads),
        (q, k, v, out, lse_out, *strides(q), *strides(k), *strides(v), *strides(o),
         heads, kv_heads, heads // kv_heads, seq_q, seq_k, float(scale), plan.keys_per_split, rows,
         *variant.window_args(seq_q, seq_k), float(variant.softcap)),
        dict(dense_constexprs, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, FINAL=final),
        DECODE_WARPS,
        plan.num_stages,
    )
    if final:
        return [decode]
    combine = KernelLaunch(
        attention_decode_combine_kernel,
        (rows,),
        (out, lse_out, o, lse, *strides(o), heads, seq_q, rows, plan.splits),
        dict(HEAD_DIM=head_dim, HEAD_DIM_PADDED=padded, BLOCK_S=triton.next_power_of_2(plan.splits),
             SPLIT_CHUNK=DECODE_COMBINE_SPLITS),
        DECODE_COMBINE_WARPS,
        1,
    )
    return [decode, combine]
