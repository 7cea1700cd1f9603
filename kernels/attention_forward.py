"""The Triton attention forward, FlashAttention-2 style: each program owns ``BLOCK_M`` query rows
of one head and streams the key/value tiles of its kv head past them with an online softmax
(running max and sum in fp32, ``exp2`` with ``log2(e)`` folded into the scale), so the
``seq_q × seq_k`` score matrix never exists. With a causal mask only the tiles that cross the
diagonal pay for masking, and tiles above it are never visited. It saves ``lse``, the natural-log
log-sum-exp of each query row. The key-tile loop and the epilogue are shared with the decode kernel.
"""

import triton
import triton.language as tl

from .attention_configs import autotuned, launch, seq_bucket, shape_constexprs, strides
from .tiles import load_tile, store_tile, tile_pointers

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2(e))
LN2 = tl.constexpr(0.6931471805599453)  # a log2-domain lse times ln(2) is the natural-log lse


@triton.jit
def forward_key_tiles(
    acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    rows, offs_n, offs_d, seq_k, causal_offset, qk_scale, start_n, end_n,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key tiles [start_n, end_n); MASKED tiles cross the diagonal or the end of
    the keys. ``qk_scale`` (scale · log2(e)) must be >= 0: the host negates q for a negative scale.
    ``row_max`` is in the log2 domain and stays -inf until the row has seen a key."""
    for tile_start in range(start_n, end_n, BLOCK_N):
        cols = tile_start + offs_n
        k = load_tile(tile_pointers(k_base, cols, stride_kn, offs_d, stride_kd), cols, seq_k, offs_d, HEAD_DIM,
                      MASKED, PAD_D)
        v = load_tile(tile_pointers(v_base, cols, stride_vn, offs_d, stride_vd), cols, seq_k, offs_d, HEAD_DIM,
                      MASKED, PAD_D)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # unscaled
        if MASKED:
            scores = scores * qk_scale  # log2 domain; masked after scaling (-inf · 0 would be NaN)
            visible = cols[None, :] < seq_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))  # stays -inf while a row has seen no key
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # such a row: exp2 gives 0, not NaN
            probs = tl.math.exp2(scores - shift[:, None])
        else:
            # qk_scale >= 0, so the scaled max is the max times the scale; the scale then folds into
            # exp2's argument (one FMA per score instead of a multiply and a subtract)
            new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
            shift = new_max
            probs = tl.math.exp2(scores * qk_scale - shift[:, None])
        correction = tl.math.exp2(row_max - shift)
        row_sum = row_sum * correction + tl.sum(probs, 1)
        acc = acc * correction[:, None]
        acc = tl.dot(probs.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, row_max, row_sum


@triton.jit
def normalized_rows(acc, row_max, row_sum):
    """Output rows acc / row_sum and their log-sum-exp in the log2 domain; a row that saw no key
    (row_sum 0) gets output 0 and lse -inf."""
    sees_keys = row_sum > 0.0
    safe_sum = tl.where(sees_keys, row_sum, 1.0)
    return acc / safe_sum[:, None], tl.where(sees_keys, row_max + tl.math.log2(safe_sum), float("-inf"))


@triton.jit
def attention_forward_kernel(
    q_ptr,  # (batch, heads, seq_q, head_dim), any strides
    k_ptr,  # (batch, kv_heads, seq_k, head_dim), any strides
    v_ptr,  # (batch, kv_heads, seq_k, head_dim), any strides
    o_ptr,  # (batch, heads, seq_q, head_dim) output
    lse_ptr,  # (batch, heads, seq_q) fp32 output, contiguous
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
    q_base = q_ptr + batch * stride_qb + head * stride_qh
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    q = load_tile(tile_pointers(q_base, rows, stride_qm, offs_d, stride_qd), rows, seq_q, offs_d, HEAD_DIM, True, PAD_D)

    # key tiles [0, full_end) need no mask; [full_end, end_n) cross the diagonal or the end of the keys
    causal_offset = seq_k - seq_q
    if CAUSAL:
        end_n = tl.minimum(tl.maximum(m_block * BLOCK_M + BLOCK_M + causal_offset, 0), seq_k)
        full_end = tl.maximum(m_block * BLOCK_M + causal_offset + 1, 0) // BLOCK_N * BLOCK_N
        full_end = tl.minimum(full_end, end_n)
    else:
        end_n = seq_k
        full_end = seq_k // BLOCK_N * BLOCK_N

    qk_scale = scale * LOG2E  # softmax in exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, row_max, row_sum = forward_key_tiles(
        acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        rows, offs_n, offs_d, seq_k, causal_offset, qk_scale, 0, full_end,
        HEAD_DIM, BLOCK_N, CAUSAL, False, PAD_D, DOT_PRECISION,
    )
    acc, row_max, row_sum = forward_key_tiles(
        acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        rows, offs_n, offs_d, seq_k, causal_offset, qk_scale, full_end, end_n,
        HEAD_DIM, BLOCK_N, CAUSAL, True, PAD_D, DOT_PRECISION,
    )

    out, lse2 = normalized_rows(acc, row_max, row_sum)
    tl.store(lse_ptr + batch_head.to(tl.int64) * seq_q + rows, lse2 * LN2, mask=rows < seq_q)
    o_base = o_ptr + batch * stride_ob + head * stride_oh
    store_tile(tile_pointers(o_base, rows, stride_om, offs_d, stride_od), out.to(o_ptr.dtype.element_ty),
               rows, seq_q, offs_d, HEAD_DIM, PAD_D)


forward_tuned = autotuned(attention_forward_kernel, "forward")


def forward_args(q, k, v, o, lse, scale):
    """The forward kernel's run-time arguments, in order."""
    heads, seq_q = q.shape[1], q.shape[2]
    kv_heads, seq_k = k.shape[1], k.shape[2]
    return (
        q, k, v, o, lse, *strides(q), *strides(k), *strides(v), *strides(o),
        heads, heads // kv_heads, seq_q, seq_k, float(scale), seq_bucket(seq_q), seq_bucket(seq_k),
    )


def launch_forward(q, k, v, o, lse, causal, scale):
    """Write o and lse with the forward kernel (any number of queries)."""
    batch, heads, seq_q, head_dim = q.shape

    def grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

    launch(forward_tuned, attention_forward_kernel, grid, forward_args(q, k, v, o, lse, scale),
           shape_constexprs(head_dim, q.dtype, causal))
