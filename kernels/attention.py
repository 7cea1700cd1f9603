"""Fused causal attention in Triton, FlashAttention-2 style: forward and backward.

Forward: each program owns ``BLOCK_M`` query rows of one head and streams the key/value tiles
of its kv head past them with an online softmax (running max and sum in fp32, ``exp2`` with
``log2(e)`` folded into the scale), so the ``seq_q × seq_k`` score matrix never exists. With a
causal mask only the tiles that cross the diagonal pay for masking, and tiles above it are never
visited. It saves ``lse``, the natural-log log-sum-exp of each query row.

Decode (at most ``DECODE_MAX_QUERIES`` queries, as when generating against a KV cache): one
program per (key split, batch, kv head) whose tile rows are every query of every head in the
GQA group, so each K/V tile is read once per group; the keys are split so the programs fill the
GPU, and a second kernel merges the splits by their log-sum-exp (flash-decoding).

Backward (deterministic, no atomics): a preprocess computes ``delta = rowsum(dO ∘ O)``; one
kernel owns a key block and loops over query blocks — and over every query head of its GQA
group, so dK and dV are summed in registers — and another owns a query block and loops over key
blocks for dQ.

The causal mask is aligned bottom-right (query ``i`` sees keys ``j <= i + seq_k - seq_q``); rows
that see no key output zeros with ``lse = -inf`` and contribute no gradient. Head dims that are
not a power of two are padded inside the kernel with masked loads. Every tensor is addressed
through all four of its strides, so any layout works without a copy.
"""

import collections
import math

import torch
import triton
import triton.language as tl

from . import device_unsupported_reason, interpreting

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MAX_HEAD_DIM = 256
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- tile helpers


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a (rows, head_dim) tile; a mask only where a tile edge can fall inside it."""
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(ptrs, tile, rows, n_rows, cols, HEAD_DIM: tl.constexpr, CHECK_COLS: tl.constexpr):
    if CHECK_COLS:
        tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))
    else:
        tl.store(ptrs, tile, mask=rows[:, None] < n_rows)


@triton.jit
def _load_log2_lse(lse_ptrs, rows, seq_q, CHECK_ROWS: tl.constexpr):
    """lse in the log2 domain; -inf (a row that sees no key) and padding rows become +inf so exp2(s - lse) = 0."""
    if CHECK_ROWS:
        lse = tl.load(lse_ptrs, mask=rows < seq_q, other=float("inf"))
    else:
        lse = tl.load(lse_ptrs)
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


# ----------------------------------------------------------------------------- forward kernel


@triton.jit
def _forward_key_tiles(
    acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    rows, offs_n, offs_d, seq_k, causal_offset, qk_scale, start_n, end_n,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key tiles [start_n, end_n); MASKED tiles cross the diagonal or the end of the keys."""
    for tile_start in range(start_n, end_n, BLOCK_N):
        cols = tile_start + offs_n
        k = _load_tile(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       cols, seq_k, offs_d, HEAD_DIM, MASKED, PAD_D)
        v = _load_tile(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       cols, seq_k, offs_d, HEAD_DIM, MASKED, PAD_D)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 domain
        if MASKED:
            visible = cols[None, :] < seq_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
            scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        if MASKED:
            # a row that has seen no key yet keeps max -inf: subtract 0 instead so exp2 gives 0, not NaN
            new_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.math.exp2(scores - new_max[:, None])
        correction = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(probs, 1)
        acc = acc * correction[:, None]
        acc = tl.dot(probs.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, row_max, row_sum


@triton.jit
def _normalized_rows(acc, row_max, row_sum):
    """Output rows acc / row_sum and their log-sum-exp in the log2 domain; a row that saw no key
    (row_sum 0) gets output 0 and lse -inf."""
    sees_keys = row_sum > 0.0
    safe_sum = tl.where(sees_keys, row_sum, 1.0)
    return acc / safe_sum[:, None], tl.where(sees_keys, row_max + tl.math.log2(safe_sum), float("-inf"))


@triton.jit
def _attention_forward_kernel(
    Q,  # (batch, heads, seq_q, head_dim), any strides
    K,  # (batch, kv_heads, seq_k, head_dim), any strides
    V,  # (batch, kv_heads, seq_k, head_dim), any strides
    O,  # (batch, heads, seq_q, head_dim) output
    LSE,  # (batch, heads, seq_q) fp32 output, contiguous
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    heads, group_size, seq_q, seq_k, scale,
    seq_q_bucket, seq_k_bucket,  # only the autotuner's key (power-of-two buckets of seq_q, seq_k)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    num_m_blocks = tl.cdiv(seq_q, BLOCK_M)
    m_block = tl.program_id(0)
    if CAUSAL:
        m_block = num_m_blocks - 1 - m_block  # the last query blocks see the most keys: launch them first
    batch_head = tl.program_id(1)
    batch = (batch_head // heads).to(tl.int64)
    head = batch_head % heads
    kv_head = (head // group_size).to(tl.int64)
    head = head.to(tl.int64)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PADDED

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    q_base = Q + batch * stride_qb + head * stride_qh
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    q = _load_tile(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   rows, seq_q, offs_d, HEAD_DIM, True, PAD_D)

    # key tiles [0, full_end) need no mask; [full_end, end_n) cross the diagonal or the end of the keys
    causal_offset = seq_k - seq_q
    if CAUSAL:
        end_n = tl.minimum(tl.maximum(m_block * BLOCK_M + BLOCK_M + causal_offset, 0), seq_k)
        full_end = tl.maximum(m_block * BLOCK_M + causal_offset + 1, 0) // BLOCK_N * BLOCK_N
        full_end = tl.minimum(full_end, end_n)
    else:
        end_n = seq_k
        full_end = seq_k // BLOCK_N * BLOCK_N

    qk_scale = scale * 1.4426950408889634  # log2(e): softmax in exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, row_max, row_sum = _forward_key_tiles(
        acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        rows, offs_n, offs_d, seq_k, causal_offset, qk_scale, 0, full_end,
        HEAD_DIM, BLOCK_N, CAUSAL, False, PAD_D, DOT_PRECISION,
    )
    acc, row_max, row_sum = _forward_key_tiles(
        acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        rows, offs_n, offs_d, seq_k, causal_offset, qk_scale, full_end, end_n,
        HEAD_DIM, BLOCK_N, CAUSAL, True, PAD_D, DOT_PRECISION,
    )

    out, lse2 = _normalized_rows(acc, row_max, row_sum)
    tl.store(LSE + batch_head.to(tl.int64) * seq_q + rows, lse2 * 0.6931471805599453, mask=rows < seq_q)
    o_base = O + batch * stride_ob + head * stride_oh
    _store_tile(o_base + rows[:, None] * stride_om + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
                rows, seq_q, offs_d, HEAD_DIM, PAD_D)


# ----------------------------------------------------------------------------- decode (flash-decoding)


@triton.jit
def _attention_decode_kernel(
    Q,  # (batch, heads, seq_q, head_dim), any strides
    K,  # (batch, kv_heads, seq_k, head_dim), any strides
    V,  # (batch, kv_heads, seq_k, head_dim), any strides
    OUT,  # FINAL: O (batch, heads, seq_q, head_dim); else fp32 partials (splits, batch·heads·seq_q, HEAD_DIM_PADDED)
    LSE_OUT,  # FINAL: lse (batch, heads, seq_q), natural log; else fp32 (splits, batch·heads·seq_q), log2 domain
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,  # of O when FINAL
    heads, kv_heads, group_size, seq_q, seq_k, scale, keys_per_split, rows,  # rows = batch·heads·seq_q
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FINAL: tl.constexpr,
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
    q = tl.load(Q + batch * stride_qb + head[:, None] * stride_qh + query[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=is_row[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch * stride_vb + kv_head.to(tl.int64) * stride_vh

    # this split's keys [start_n, end_n): [start_n, full_end) unmasked, the rest masked
    causal_offset = seq_k - seq_q
    start_n = split * keys_per_split
    end_n = tl.minimum(start_n + keys_per_split, seq_k)
    if CAUSAL:
        end_n = tl.minimum(end_n, tl.maximum(seq_q + causal_offset, 0))
        full_end = tl.maximum(causal_offset + 1, 0) // BLOCK_N * BLOCK_N  # keys every query sees
    else:
        full_end = seq_k // BLOCK_N * BLOCK_N
    full_end = tl.minimum(tl.maximum(full_end, start_n), tl.maximum(end_n, start_n))

    qk_scale = scale * 1.4426950408889634
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, row_max, row_sum = _forward_key_tiles(
        acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        query, offs_n, offs_d, seq_k, causal_offset, qk_scale, start_n, full_end,
        HEAD_DIM, BLOCK_N, CAUSAL, False, PAD_D, DOT_PRECISION,
    )
    acc, row_max, row_sum = _forward_key_tiles(
        acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        query, offs_n, offs_d, seq_k, causal_offset, qk_scale, full_end, end_n,
        HEAD_DIM, BLOCK_N, CAUSAL, True, PAD_D, DOT_PRECISION,
    )

    out, lse2 = _normalized_rows(acc, row_max, row_sum)
    flat_row = (batch * heads + head) * seq_q + query  # row of (batch, heads, seq_q) flattened
    if FINAL:
        tl.store(LSE_OUT + flat_row, lse2 * 0.6931471805599453, mask=is_row)
        o_ptrs = (OUT + batch * stride_ob + head[:, None] * stride_oh + query[:, None] * stride_om
                  + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=is_row[:, None] & (offs_d[None, :] < HEAD_DIM))
    else:
        part_row = split * rows + flat_row
        tl.store(LSE_OUT + part_row, lse2, mask=is_row)
        tl.store(OUT + part_row[:, None] * HEAD_DIM_PADDED + offs_d[None, :], out, mask=is_row[:, None])


@triton.jit
def _attention_decode_combine_kernel(
    PART_O,  # fp32 (splits, rows, HEAD_DIM_PADDED): each split's normalized output
    PART_LSE,  # fp32 (splits, rows): each split's log-sum-exp, log2 domain, -inf where it saw no key
    O,  # (batch, heads, seq_q, head_dim) output
    LSE,  # (batch, heads, seq_q) fp32 output, contiguous
    stride_ob, stride_oh, stride_om, stride_od,
    heads, seq_q, rows, splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Merge the splits of each row by their log-sum-exp, one split at a time (an online softmax over splits)."""
    flat_row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    is_row = flat_row < rows
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    acc = tl.zeros([BLOCK_R, HEAD_DIM_PADDED], dtype=tl.float32)
    total_max = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    total_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    for split in range(0, splits):
        part_row = split * rows + flat_row
        lse2 = tl.load(PART_LSE + part_row, mask=is_row, other=float("-inf"))
        part = tl.load(PART_O + part_row[:, None] * HEAD_DIM_PADDED + offs_d[None, :], mask=is_row[:, None], other=0.0)
        new_max = tl.maximum(total_max, lse2)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no key yet: weights 0, not NaN
        correction = tl.math.exp2(total_max - shift)
        weight = tl.math.exp2(lse2 - shift)
        acc = acc * correction[:, None] + part * weight[:, None]
        total_sum = total_sum * correction + weight
        total_max = new_max
    out, lse2 = _normalized_rows(acc, total_max, total_sum)
    tl.store(LSE + flat_row, lse2 * 0.6931471805599453, mask=is_row)
    batch_head = flat_row // seq_q
    o_ptrs = (O + (batch_head // heads).to(tl.int64)[:, None] * stride_ob + (batch_head % heads)[:, None] * stride_oh
              + (flat_row % seq_q)[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=is_row[:, None] & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------- backward kernels


@triton.jit
def _attention_backward_preprocess_kernel(
    O,  # (batch, heads, seq_q, head_dim), any strides
    DO,  # (batch, heads, seq_q, head_dim), any strides
    DELTA,  # (batch, heads, seq_q) fp32 output, contiguous
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    heads, seq_q,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO ∘ O) in fp32: the softmax backward's per-row term, equal to rowsum(P ∘ dP)."""
    batch_head = tl.program_id(1)
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    mask = (rows[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + batch * stride_ob + head * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0)
    do = tl.load(DO + batch * stride_dob + head * stride_doh + rows[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + batch_head.to(tl.int64) * seq_q + rows, delta, mask=rows < seq_q)


@triton.jit
def _dkdv_query_tiles(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_lsem,
    cols, offs_m, offs_d, seq_q, causal_offset, qk_scale, start_m, end_m,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV of one key block over query tiles [start_m, end_m), in transposed (key-major) form."""
    for tile_start in range(start_m, end_m, BLOCK_M):
        rows = tile_start + offs_m
        q = _load_tile(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                       rows, seq_q, offs_d, HEAD_DIM, MASKED, PAD_D)
        do = _load_tile(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                        rows, seq_q, offs_d, HEAD_DIM, MASKED, PAD_D)
        lse = _load_log2_lse(lse_base + rows * stride_lsem, rows, seq_q, MASKED)
        if MASKED:
            delta = tl.load(delta_base + rows, mask=rows < seq_q, other=0.0)
        else:
            delta = tl.load(delta_base + rows)
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (keys, queries)
        probs_t = tl.math.exp2(scores_t - lse[None, :])  # padding rows have lse +inf: 0
        if MASKED and CAUSAL:
            probs_t = tl.where(cols[:, None] <= rows[None, :] + causal_offset, probs_t, 0.0)
        dv = tl.dot(probs_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dprobs_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dscores_t = probs_t * (dprobs_t - delta[None, :])
        dk = tl.dot(dscores_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attention_backward_dkdv_kernel(
    Q,  # (batch, heads, seq_q, head_dim), any strides
    K,  # (batch, kv_heads, seq_k, head_dim), any strides
    V,  # (batch, kv_heads, seq_k, head_dim), any strides
    DO,  # (batch, heads, seq_q, head_dim), any strides
    LSE,  # (batch, heads, seq_q) fp32, natural log, any strides
    DELTA,  # (batch, heads, seq_q) fp32, contiguous
    DK,  # (batch, kv_heads, seq_k, head_dim) output
    DV,  # (batch, kv_heads, seq_k, head_dim) output
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lseb, stride_lseh, stride_lsem,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    heads, kv_heads, group_size, seq_q, seq_k, scale,
    seq_q_bucket, seq_k_bucket,  # only the autotuner's key (power-of-two buckets of seq_q, seq_k)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n_block = tl.program_id(0)
    batch_kv_head = tl.program_id(1)
    batch = (batch_kv_head // kv_heads).to(tl.int64)
    kv_head = batch_kv_head % kv_heads
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PADDED

    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    k = _load_tile(K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh + cols[:, None] * stride_kn
                   + offs_d[None, :] * stride_kd, cols, seq_k, offs_d, HEAD_DIM, True, PAD_D)
    v = _load_tile(V + batch * stride_vb + kv_head.to(tl.int64) * stride_vh + cols[:, None] * stride_vn
                   + offs_d[None, :] * stride_vd, cols, seq_k, offs_d, HEAD_DIM, True, PAD_D)

    # query tiles [start_m, full_start) cross the diagonal; [full_start, tail_start) need no mask;
    # [tail_start, seq_q) holds the partial last query tile
    causal_offset = seq_k - seq_q
    if CAUSAL:
        start_m = tl.maximum(n_block * BLOCK_N - causal_offset, 0) // BLOCK_M * BLOCK_M
        full_start = tl.cdiv(tl.maximum(n_block * BLOCK_N + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
        full_start = tl.minimum(tl.maximum(full_start, start_m), seq_q)
    else:
        start_m = 0
        full_start = 0
    tail_start = tl.maximum(full_start, seq_q // BLOCK_M * BLOCK_M)

    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], dtype=tl.float32)
    # every query head of the GQA group adds into the same dK, dV: summed here, no atomics
    for head_in_group in range(0, group_size):
        head = (kv_head * group_size + head_in_group).to(tl.int64)
        q_base = Q + batch * stride_qb + head * stride_qh
        do_base = DO + batch * stride_dob + head * stride_doh
        lse_base = LSE + batch * stride_lseb + head * stride_lseh
        delta_base = DELTA + (batch * heads + head) * seq_q
        dk, dv = _dkdv_query_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_lsem,
            cols, offs_m, offs_d, seq_q, causal_offset, qk_scale, start_m, full_start,
            HEAD_DIM, BLOCK_M, CAUSAL, True, PAD_D, DOT_PRECISION,
        )
        dk, dv = _dkdv_query_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_lsem,
            cols, offs_m, offs_d, seq_q, causal_offset, qk_scale, full_start, tail_start,
            HEAD_DIM, BLOCK_M, CAUSAL, False, PAD_D, DOT_PRECISION,
        )
        dk, dv = _dkdv_query_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_lsem,
            cols, offs_m, offs_d, seq_q, causal_offset, qk_scale, tail_start, seq_q,
            HEAD_DIM, BLOCK_M, CAUSAL, True, PAD_D, DOT_PRECISION,
        )

    dk = dk * scale
    dk_base = DK + batch * stride_dkb + kv_head.to(tl.int64) * stride_dkh
    dv_base = DV + batch * stride_dvb + kv_head.to(tl.int64) * stride_dvh
    _store_tile(dk_base + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
                cols, seq_k, offs_d, HEAD_DIM, PAD_D)
    _store_tile(dv_base + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
                cols, seq_k, offs_d, HEAD_DIM, PAD_D)


@triton.jit
def _dq_key_tiles(
    dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    rows, offs_n, offs_d, seq_k, causal_offset, qk_scale, start_n, end_n,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ of one query block over key tiles [start_n, end_n) (unscaled: times scale at the end)."""
    for tile_start in range(start_n, end_n, BLOCK_N):
        cols = tile_start + offs_n
        k = _load_tile(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       cols, seq_k, offs_d, HEAD_DIM, MASKED, PAD_D)
        v = _load_tile(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       cols, seq_k, offs_d, HEAD_DIM, MASKED, PAD_D)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        probs = tl.math.exp2(scores - lse[:, None])  # rows that see no key have lse +inf: 0
        if MASKED:
            visible = cols[None, :] < seq_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
            probs = tl.where(visible, probs, 0.0)
        dprobs = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        dscores = probs * (dprobs - delta[:, None])
        dq = tl.dot(dscores.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attention_backward_dq_kernel(
    Q,  # (batch, heads, seq_q, head_dim), any strides
    K,  # (batch, kv_heads, seq_k, head_dim), any strides
    V,  # (batch, kv_heads, seq_k, head_dim), any strides
    DO,  # (batch, heads, seq_q, head_dim), any strides
    LSE,  # (batch, heads, seq_q) fp32, natural log, any strides
    DELTA,  # (batch, heads, seq_q) fp32, contiguous
    DQ,  # (batch, heads, seq_q, head_dim) output
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lseb, stride_lseh, stride_lsem,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    heads, group_size, seq_q, seq_k, scale,
    seq_q_bucket, seq_k_bucket,  # only the autotuner's key (power-of-two buckets of seq_q, seq_k)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    num_m_blocks = tl.cdiv(seq_q, BLOCK_M)
    m_block = tl.program_id(0)
    if CAUSAL:
        m_block = num_m_blocks - 1 - m_block  # heaviest query blocks first
    batch_head = tl.program_id(1)
    batch = (batch_head // heads).to(tl.int64)
    head = batch_head % heads
    kv_head = (head // group_size).to(tl.int64)
    head = head.to(tl.int64)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PADDED

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    q = _load_tile(Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   rows, seq_q, offs_d, HEAD_DIM, True, PAD_D)
    do = _load_tile(DO + batch * stride_dob + head * stride_doh + rows[:, None] * stride_dom
                    + offs_d[None, :] * stride_dod, rows, seq_q, offs_d, HEAD_DIM, True, PAD_D)
    lse = _load_log2_lse(LSE + batch * stride_lseb + head * stride_lseh + rows * stride_lsem, rows, seq_q, True)
    delta = tl.load(DELTA + batch_head.to(tl.int64) * seq_q + rows, mask=rows < seq_q, other=0.0)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh

    # same key ranges as the forward
    causal_offset = seq_k - seq_q
    if CAUSAL:
        end_n = tl.minimum(tl.maximum(m_block * BLOCK_M + BLOCK_M + causal_offset, 0), seq_k)
        full_end = tl.maximum(m_block * BLOCK_M + causal_offset + 1, 0) // BLOCK_N * BLOCK_N
        full_end = tl.minimum(full_end, end_n)
    else:
        end_n = seq_k
        full_end = seq_k // BLOCK_N * BLOCK_N

    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    dq = _dq_key_tiles(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        rows, offs_n, offs_d, seq_k, causal_offset, qk_scale, 0, full_end,
        HEAD_DIM, BLOCK_N, CAUSAL, False, PAD_D, DOT_PRECISION,
    )
    dq = _dq_key_tiles(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        rows, offs_n, offs_d, seq_k, causal_offset, qk_scale, full_end, end_n,
        HEAD_DIM, BLOCK_N, CAUSAL, True, PAD_D, DOT_PRECISION,
    )
    dq = dq * scale
    _store_tile(DQ + batch * stride_dqb + head * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
                dq.to(DQ.dtype.element_ty), rows, seq_q, offs_d, HEAD_DIM, PAD_D)


# ----------------------------------------------------------------------------- host functions


def attention_unsupported(q, k, v):
    """None when these kernels can run on q, k, v here, else why not."""
    reason = device_unsupported_reason(q, k, v)
    if reason is not None:
        return reason
    if q.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float32, float16 or bfloat16)"
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"head_dim {head_dim} is outside 1..{MAX_HEAD_DIM}"
    if q.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(q.device)
        if major < 8 and q.dtype == torch.bfloat16:
            return f"bfloat16 needs compute capability 8.0 or newer, this GPU has {major}.{minor}"
    return None


def _head_dim_padded(head_dim):
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs power-of-two tiles of at least 16


def _dot_precision(dtype):
    # fp32 inputs get true fp32 products ("ieee": several times slower than tf32 tensor cores, but
    # float32 users asked for float32 accuracy); the setting does not affect fp16/bf16 operands
    return "ieee" if dtype == torch.float32 else "tf32"


def _seq_bucket(n):
    """Autotuning bucket of a sequence length: decode (1), then powers of two up to 16k."""
    return min(triton.next_power_of_2(n), 16384)


def _strides(t):
    return tuple(t.stride())


def _on_device(t):
    """The CUDA device context of t (launches go to the right GPU); nothing under the interpreter."""
    import contextlib

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _launch(tuned, kernel, grid, args, constexprs):
    """Launch through the autotuner on a GPU; one fixed small tile under the interpreter (fast CPU tests)."""
    if interpreting():
        kernel[grid](*args, **constexprs, **INTERPRETER_BLOCKS)
    else:
        tuned[grid](*args, **constexprs)


def attention_forward(q, k, v, causal, scale):
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    o = torch.empty((batch, heads, seq_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    plan = _decode_plan(batch, kv_heads, heads // kv_heads, seq_q, seq_k, head_dim, q)
    if plan is not None:
        with _on_device(q):
            _decode_forward(q, k, v, o, lse, causal, scale, plan)
        return o, lse
    args = (
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        heads, heads // kv_heads, seq_q, seq_k, float(scale), _seq_bucket(seq_q), _seq_bucket(seq_k),
    )
    constexprs = dict(
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=_head_dim_padded(head_dim), CAUSAL=bool(causal),
        DOT_PRECISION=_dot_precision(q.dtype),
    )

    def grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

    with _on_device(q):
        _launch(_forward_tuned, _attention_forward_kernel, grid, args, constexprs)
    return o, lse


def _decode_tiles(head_dim_padded, itemsize):
    """The decode kernel's key tile and pipeline depth on a GPU: K and V tiles 3 deep where they
    fit in 96 KiB of shared memory, else 2."""
    block_n = 64 if head_dim_padded <= 128 else 32
    num_stages = 3 if 2 * 3 * block_n * head_dim_padded * itemsize <= 96 * 1024 else 2
    return block_n, num_stages


def _decode_plan(batch, kv_heads, group_size, seq_q, seq_k, head_dim, q):
    """``DecodePlan`` when the queries are few enough for the decode kernel (every query of a GQA
    group in one tile of at most DECODE_MAX_ROWS rows), else None. Keys are split so that
    batch · kv_heads · splits programs fill the GPU, each split at least two key tiles long."""
    rows = group_size * seq_q
    if seq_q > DECODE_MAX_QUERIES or rows > DECODE_MAX_ROWS:
        return None
    head_dim_padded = _head_dim_padded(head_dim)
    if interpreting():
        block_n, wanted_splits, num_stages = INTERPRETER_BLOCKS["BLOCK_N"], 4, 1
    else:
        block_n, num_stages = _decode_tiles(head_dim_padded, q.element_size())
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        wanted_splits = triton.cdiv(2 * sms, batch * kv_heads)
    splits = max(1, min(wanted_splits, triton.cdiv(seq_k, 2 * block_n), DECODE_MAX_SPLITS))
    keys_per_split = triton.cdiv(triton.cdiv(seq_k, splits), block_n) * block_n
    return DecodePlan(
        block_m=max(16, triton.next_power_of_2(rows)), block_n=block_n, num_stages=num_stages,
        splits=triton.cdiv(seq_k, keys_per_split), keys_per_split=keys_per_split,
    )


def _decode_forward(q, k, v, o, lse, causal, scale, plan):
    """Flash-decoding: each key split writes its normalized partial output and log-sum-exp, and a
    second kernel merges them; with a single split the first kernel writes o and lse itself."""
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    head_dim_padded = _head_dim_padded(head_dim)
    rows = batch * heads * seq_q
    final = plan.splits == 1
    if final:
        out, lse_out = o, lse
    else:
        out = torch.empty((plan.splits, rows, head_dim_padded), dtype=torch.float32, device=q.device)
        lse_out = torch.empty((plan.splits, rows), dtype=torch.float32, device=q.device)
    _attention_decode_kernel[(plan.splits, batch * kv_heads)](
        q, k, v, out, lse_out, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        heads, kv_heads, heads // kv_heads, seq_q, seq_k, float(scale), plan.keys_per_split, rows,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, CAUSAL=bool(causal), DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, FINAL=final, num_warps=4, num_stages=plan.num_stages,
    )
    if not final:
        _attention_decode_combine_kernel[(triton.cdiv(rows, DECODE_COMBINE_ROWS),)](
            out, lse_out, o, lse, *_strides(o), heads, seq_q, rows, plan.splits,
            HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, BLOCK_R=DECODE_COMBINE_ROWS, num_warps=4,
        )


def attention_backward(do, q, k, v, o, lse, causal, scale):
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    dq = torch.empty((batch, heads, seq_q, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, kv_heads, seq_k, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, kv_heads, seq_k, head_dim), dtype=v.dtype, device=v.device)
    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    head_dim_padded = _head_dim_padded(head_dim)
    tuned = dict(
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, CAUSAL=bool(causal), DOT_PRECISION=_dot_precision(q.dtype)
    )
    buckets = (_seq_bucket(seq_q), _seq_bucket(seq_k))
    with _on_device(q):
        preprocess_rows = PREPROCESS_BLOCK_M if not interpreting() else INTERPRETER_BLOCKS["BLOCK_M"]
        _attention_backward_preprocess_kernel[(triton.cdiv(seq_q, preprocess_rows), batch * heads)](
            o, do, delta, *_strides(o), *_strides(do), heads, seq_q,
            HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, BLOCK_M=preprocess_rows,
        )
        _launch(
            _dkdv_tuned, _attention_backward_dkdv_kernel,
            lambda meta: (triton.cdiv(seq_k, meta["BLOCK_N"]), batch * kv_heads),
            (
                q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
                *_strides(lse), *_strides(dk), *_strides(dv),
                heads, kv_heads, heads // kv_heads, seq_q, seq_k, float(scale), *buckets,
            ),
            tuned,
        )
        _launch(
            _dq_tuned, _attention_backward_dq_kernel,
            lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads),
            (
                q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
                *_strides(lse), *_strides(dq), heads, heads // kv_heads, seq_q, seq_k, float(scale), *buckets,
            ),
            tuned,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------- launch configuration

# Under the interpreter every program runs one after another in numpy: one small tile, no autotuning.
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
PREPROCESS_BLOCK_M = 64

# Decode: at most this many queries, and queries × GQA group size rows, go to the decode kernel;
# keys are split at most DECODE_MAX_SPLITS ways, and the merge handles DECODE_COMBINE_ROWS rows a program.
DECODE_MAX_QUERIES = 4
DECODE_MAX_ROWS = 64
DECODE_MAX_SPLITS = 128
DECODE_COMBINE_ROWS = 16
DecodePlan = collections.namedtuple("DecodePlan", "block_m block_n num_stages splits keys_per_split")

# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may pick, per GPU generation. BLOCK_M is
# the query tile and BLOCK_N the key tile in every kernel. On Hopper a 128-row tile with 8 warps
# (two warpgroups of 64 rows) lets tl.dot lower to wgmma; K/V (or Q/dO) tiles are software
# pipelined num_stages deep through shared memory.
FORWARD_CONFIGS = {
    "hopper": [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
    "ampere": [(128, 64, 8, 3), (64, 64, 4, 3)],
}
# dK/dV: one key tile (BLOCK_N) stays in registers while query tiles (BLOCK_M) stream past it
DKDV_CONFIGS = {
    "hopper": [(64, 128, 8, 2), (32, 64, 4, 2)],
    "ampere": [(64, 128, 8, 2), (32, 64, 4, 2)],
}
# dQ: one query tile stays in registers while key tiles stream past it
DQ_CONFIGS = {
    "hopper": [(128, 64, 8, 2), (64, 64, 4, 2)],
    "ampere": [(128, 64, 8, 2), (64, 64, 4, 2)],
}
_KNOWN_SHARED_MEMORY = {"hopper": 232448, "ampere": 166912}  # opt-in bytes per block, sm_90 and sm_80


def _as_config(blocks):
    block_m, block_n, num_warps, num_stages = blocks
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


def _blocks_of(config):
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def _all_blocks(configs_by_arch):
    """Every configuration of any generation, in a stable order without repeats."""
    return list(dict.fromkeys(b for blocks in configs_by_arch.values() for b in blocks))


def _forward_shared_bytes(block_m, block_n, num_stages, head_dim_padded, itemsize):
    return (block_m + 2 * num_stages * block_n) * head_dim_padded * itemsize  # Q + pipelined K, V


def _dkdv_shared_bytes(block_m, block_n, num_stages, head_dim_padded, itemsize):
    return (2 * block_n + 2 * num_stages * block_m) * head_dim_padded * itemsize  # K, V + pipelined Q, dO


def _dq_shared_bytes(block_m, block_n, num_stages, head_dim_padded, itemsize):
    return (2 * block_m + 2 * num_stages * block_n) * head_dim_padded * itemsize  # Q, dO + pipelined K, V


def _arch_of(device):
    major, _ = torch.cuda.get_device_capability(device)
    return "hopper" if major == 9 else "ampere"


def _shared_memory_limit(device, arch):
    try:
        return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]
    except Exception:  # noqa: BLE001 - an older driver API: fall back to the generation's known limit
        return _KNOWN_SHARED_MEMORY[arch]


def _select_blocks(configs_by_arch, shared_bytes, arch, shared_limit, head_dim_padded, itemsize, seq_q, seq_k):
    """This generation's configurations whose shared memory fits (with room for Triton's own
    scratch), without tiles far larger than the sequences; the smallest one if none fits."""
    candidates = configs_by_arch[arch]
    smallest_m = min(b[0] for b in candidates)
    smallest_n = min(b[1] for b in candidates)
    fits = [
        b
        for b in candidates
        if shared_bytes(b[0], b[1], b[3], head_dim_padded, itemsize) + 8192 <= shared_limit
        and b[0] <= max(triton.next_power_of_2(seq_q), smallest_m)
        and b[1] <= max(triton.next_power_of_2(seq_k), smallest_n)
    ]
    if fits:
        return fits
    return [min(candidates, key=lambda b: shared_bytes(b[0], b[1], b[3], head_dim_padded, itemsize))]


def _pruner(configs_by_arch, shared_bytes):
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        arch = _arch_of(q.device)
        chosen = set(
            _select_blocks(
                configs_by_arch, shared_bytes, arch, _shared_memory_limit(q.device, arch),
                kwargs["HEAD_DIM_PADDED"], q.element_size(), named_args["seq_q"], named_args["seq_k"],
            )
        )
        return [c for c in configs if _blocks_of(c) in chosen]

    return prune


def _autotuned(kernel, configs_by_arch, shared_bytes):
    return triton.autotune(
        configs=[_as_config(b) for b in _all_blocks(configs_by_arch)],
        # tensor dtypes join the key automatically
        key=["HEAD_DIM", "CAUSAL", "seq_q_bucket", "seq_k_bucket"],
        prune_configs_by={"early_config_prune": _pruner(configs_by_arch, shared_bytes)},
    )(kernel)


_forward_tuned = _autotuned(_attention_forward_kernel, FORWARD_CONFIGS, _forward_shared_bytes)
_dkdv_tuned = _autotuned(_attention_backward_dkdv_kernel, DKDV_CONFIGS, _dkdv_shared_bytes)
_dq_tuned = _autotuned(_attention_backward_dq_kernel, DQ_CONFIGS, _dq_shared_bytes)


# ----------------------------------------------------------------------------- ahead-of-time compilation

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _runtime_specialization(kernel, constexprs, dtype, fp32_tensors=("LSE", "DELTA")):
    """Signature, constants and attributes as the JIT sees a typical launch: tensors with a
    contiguous last dim (unit strides become constants 1, which vectorizes the loads), 16-byte
    aligned pointers and other strides divisible by 16. Upper-case arguments are tensors, of
    ``dtype`` except those named in ``fp32_tensors``."""
    signature, constants, attrs = {}, dict(constexprs), {}
    for index, arg in enumerate(kernel.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.startswith("stride_") and (arg.endswith("d") or arg == "stride_lsem"):
            signature[arg], constants[arg] = "constexpr", 1
        elif arg.isupper():
            signature[arg] = "*fp32" if arg in fp32_tensors else f"*{_TRITON_DTYPES[dtype]}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg.startswith("stride_"):
            signature[arg] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "fp32" if arg == "scale" else "i32"
    return signature, constants, attrs


def _spec(name, kernel, constexprs, dtype, num_warps, num_stages, fp32_tensors=("LSE", "DELTA")):
    signature, constants, attrs = _runtime_specialization(kernel, constexprs, dtype, fp32_tensors)
    return {"name": name, "kernel": kernel, "signature": signature, "constexprs": constants, "attrs": attrs,
            "num_warps": num_warps, "num_stages": num_stages}


def aot_compile_specs():
    """What tests/triton_aot.py compiles for sm_80 and sm_90: every configuration the autotuner can
    pick (on either generation) for head dim 64 in fp16 without a mask and head dim 128 in bf16
    with the causal mask (the performance target), plus the backward preprocess. A name lists the
    generations whose autotuner can pick that configuration."""
    tuned_kernels = (
        ("forward", _attention_forward_kernel, FORWARD_CONFIGS),
        ("backward_dkdv", _attention_backward_dkdv_kernel, DKDV_CONFIGS),
        ("backward_dq", _attention_backward_dq_kernel, DQ_CONFIGS),
    )
    specs = []
    for head_dim, dtype, causal in ((64, torch.float16, False), (128, torch.bfloat16, True)):
        label = f"d={head_dim} {_TRITON_DTYPES[dtype]} {'causal' if causal else 'full'}"
        dims = {"HEAD_DIM": head_dim, "HEAD_DIM_PADDED": _head_dim_padded(head_dim)}
        specs.append(_spec(f"backward_preprocess {label}", _attention_backward_preprocess_kernel,
                           {**dims, "BLOCK_M": PREPROCESS_BLOCK_M}, dtype, 4, 1))
        # decode of one query for a GQA group of 8 heads (16 rows), keys split: partials in fp32
        block_n, num_stages = _decode_tiles(dims["HEAD_DIM_PADDED"], dtype.itemsize)
        specs.append(_spec(
            f"decode {label} M=16 N={block_n} [hopper,ampere]", _attention_decode_kernel,
            {**dims, "CAUSAL": causal, "DOT_PRECISION": _dot_precision(dtype), "BLOCK_M": 16,
             "BLOCK_N": block_n, "FINAL": False},
            dtype, 4, num_stages, fp32_tensors=("OUT", "LSE_OUT"),
        ))
        specs.append(_spec(
            f"decode_combine {label} [hopper,ampere]", _attention_decode_combine_kernel,
            {**dims, "BLOCK_R": DECODE_COMBINE_ROWS}, dtype, 4, 1, fp32_tensors=("PART_O", "PART_LSE", "LSE"),
        ))
        for name, kernel, configs_by_arch in tuned_kernels:
            for blocks in _all_blocks(configs_by_arch):
                block_m, block_n, num_warps, num_stages = blocks
                archs = ",".join(arch for arch, listed in configs_by_arch.items() if blocks in listed)
                constexprs = {**dims, "CAUSAL": causal, "DOT_PRECISION": _dot_precision(dtype),
                              "BLOCK_M": block_m, "BLOCK_N": block_n}
                specs.append(_spec(f"{name} {label} M={block_m} N={block_n} [{archs}]", kernel, constexprs, dtype,
                                   num_warps, num_stages))
    return specs
