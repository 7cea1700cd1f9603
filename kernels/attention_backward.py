"""The Triton attention backward, deterministic (no atomics): a preprocess computes
``delta = rowsum(dO ∘ O)``; one kernel owns a key block and loops over query blocks — and over
every query head of its GQA group, so dK and dV are summed in registers — and another owns a query
block and loops over key blocks for dQ. Probabilities are recomputed from the forward's ``lse``.
"""

import torch
import triton
import triton.language as tl

from . import interpreting
from .attention_configs import (
    INTERPRETER_BLOCKS, autotuned, head_dim_padded, launch, seq_bucket, shape_constexprs, strides,
)
from .attention_forward import LOG2E
from .launch import KernelLaunch, on_device
from .tiles import load_tile, store_tile, tile_pointers

PREPROCESS_BLOCK_M = 64


@triton.jit
def load_log2_lse(lse_ptrs, rows, seq_q, CHECK_ROWS: tl.constexpr):
    """lse in the log2 domain; -inf (a row that sees no key) and padding rows become +inf so exp2(s - lse) = 0."""
    if CHECK_ROWS:
        lse = tl.load(lse_ptrs, mask=rows < seq_q, other=float("inf"))
    else:
        lse = tl.load(lse_ptrs)
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def attention_backward_preprocess_kernel(
    o_ptr,  # (batch, heads, seq_q, head_dim), any strides
    do_ptr,  # (batch, heads, seq_q, head_dim), any strides
    delta_ptr,  # (batch, heads, seq_q) fp32 output, contiguous
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
    o = load_tile(tile_pointers(o_ptr + batch * stride_ob + head * stride_oh, rows, stride_om, offs_d, stride_od),
                  rows, seq_q, offs_d, HEAD_DIM, True, True)
    do = load_tile(tile_pointers(do_ptr + batch * stride_dob + head * stride_doh, rows, stride_dom, offs_d, stride_dod),
                   rows, seq_q, offs_d, HEAD_DIM, True, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + batch_head.to(tl.int64) * seq_q + rows, delta, mask=rows < seq_q)


@triton.jit
def dkdv_query_tiles(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_lsem,
    cols, offs_m, offs_d, seq_q, causal_offset, qk_scale, start_m, end_m,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV of one key block over query tiles [start_m, end_m), in transposed (key-major) form."""
    for tile_start in range(start_m, end_m, BLOCK_M):
        rows = tile_start + offs_m
        q = load_tile(tile_pointers(q_base, rows, stride_qm, offs_d, stride_qd), rows, seq_q, offs_d, HEAD_DIM,
                      MASKED, PAD_D)
        do = load_tile(tile_pointers(do_base, rows, stride_dom, offs_d, stride_dod), rows, seq_q, offs_d, HEAD_DIM,
                       MASKED, PAD_D)
        lse = load_log2_lse(lse_base + rows * stride_lsem, rows, seq_q, MASKED)
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
def attention_backward_dkdv_kernel(
    q_ptr,  # (batch, heads, seq_q, head_dim), any strides
    k_ptr,  # (batch, kv_heads, seq_k, head_dim), any strides
    v_ptr,  # (batch, kv_heads, seq_k, head_dim), any strides
    do_ptr,  # (batch, heads, seq_q, head_dim), any strides
    lse_ptr,  # (batch, heads, seq_q) fp32, natural log, any strides
    delta_ptr,  # (batch, heads, seq_q) fp32, contiguous
    dk_ptr,  # (batch, kv_heads, seq_k, head_dim) output
    dv_ptr,  # (batch, kv_heads, seq_k, head_dim) output
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
    k = load_tile(tile_pointers(k_ptr + batch * stride_kb + kv_head.to(tl.int64) * stride_kh, cols, stride_kn,
                                offs_d, stride_kd), cols, seq_k, offs_d, HEAD_DIM, True, PAD_D)
    v = load_tile(tile_pointers(v_ptr + batch * stride_vb + kv_head.to(tl.int64) * stride_vh, cols, stride_vn,
                                offs_d, stride_vd), cols, seq_k, offs_d, HEAD_DIM, True, PAD_D)

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

    qk_scale = scale * LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], dtype=tl.float32)
    # every query head of the GQA group adds into the same dK, dV: summed here, no atomics
    for head_in_group in range(0, group_size):
        head = (kv_head * group_size + head_in_group).to(tl.int64)
        q_base = q_ptr + batch * stride_qb + head * stride_qh
        do_base = do_ptr + batch * stride_dob + head * stride_doh
        lse_base = lse_ptr + batch * stride_lseb + head * stride_lseh
        delta_base = delta_ptr + (batch * heads + head) * seq_q
        dk, dv = dkdv_query_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_lsem,
            cols, offs_m, offs_d, seq_q, causal_offset, qk_scale, start_m, full_start,
            HEAD_DIM, BLOCK_M, CAUSAL, True, PAD_D, DOT_PRECISION,
        )
        dk, dv = dkdv_query_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_lsem,
            cols, offs_m, offs_d, seq_q, causal_offset, qk_scale, full_start, tail_start,
            HEAD_DIM, BLOCK_M, CAUSAL, False, PAD_D, DOT_PRECISION,
        )
        dk, dv = dkdv_query_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_lsem,
            cols, offs_m, offs_d, seq_q, causal_offset, qk_scale, tail_start, seq_q,
            HEAD_DIM, BLOCK_M, CAUSAL, True, PAD_D, DOT_PRECISION,
        )

    dk = dk * scale
    dk_base = dk_ptr + batch * stride_dkb + kv_head.to(tl.int64) * stride_dkh
    dv_base = dv_ptr + batch * stride_dvb + kv_head.to(tl.int64) * stride_dvh
    store_tile(tile_pointers(dk_base, cols, stride_dkn, offs_d, stride_dkd), dk.to(dk_ptr.dtype.element_ty),
               cols, seq_k, offs_d, HEAD_DIM, PAD_D)
    store_tile(tile_pointers(dv_base, cols, stride_dvn, offs_d, stride_dvd), dv.to(dv_ptr.dtype.element_ty),
               cols, seq_k, offs_d, HEAD_DIM, PAD_D)


@triton.jit
def dq_key_tiles(
    dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    rows, offs_n, offs_d, seq_k, causal_offset, qk_scale, start_n, end_n,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ of one query block over key tiles [start_n, end_n) (unscaled: times scale at the end)."""
    for tile_start in range(start_n, end_n, BLOCK_N):
        cols = tile_start + offs_n
        k = load_tile(tile_pointers(k_base, cols, stride_kn, offs_d, stride_kd), cols, seq_k, offs_d, HEAD_DIM,
                      MASKED, PAD_D)
        v = load_tile(tile_pointers(v_base, cols, stride_vn, offs_d, stride_vd), cols, seq_k, offs_d, HEAD_DIM,
                      MASKED, PAD_D)
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
def attention_backward_dq_kernel(
    q_ptr,  # (batch, heads, seq_q, head_dim), any strides
    k_ptr,  # (batch, kv_heads, seq_k, head_dim), any strides
    v_ptr,  # (batch, kv_heads, seq_k, head_dim), any strides
    do_ptr,  # (batch, heads, seq_q, head_dim), any strides
    lse_ptr,  # (batch, heads, seq_q) fp32, natural log, any strides
    delta_ptr,  # (batch, heads, seq_q) fp32, contiguous
    dq_ptr,  # (batch, heads, seq_q, head_dim) output
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
    q = load_tile(tile_pointers(q_ptr + batch * stride_qb + head * stride_qh, rows, stride_qm, offs_d, stride_qd),
                  rows, seq_q, offs_d, HEAD_DIM, True, PAD_D)
    do = load_tile(tile_pointers(do_ptr + batch * stride_dob + head * stride_doh, rows, stride_dom, offs_d,
                                 stride_dod), rows, seq_q, offs_d, HEAD_DIM, True, PAD_D)
    lse = load_log2_lse(lse_ptr + batch * stride_lseb + head * stride_lseh + rows * stride_lsem, rows, seq_q, True)
    delta = tl.load(delta_ptr + batch_head.to(tl.int64) * seq_q + rows, mask=rows < seq_q, other=0.0)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    # same key ranges as the forward
    causal_offset = seq_k - seq_q
    if CAUSAL:
        end_n = tl.minimum(tl.maximum(m_block * BLOCK_M + BLOCK_M + causal_offset, 0), seq_k)
        full_end = tl.maximum(m_block * BLOCK_M + causal_offset + 1, 0) // BLOCK_N * BLOCK_N
        full_end = tl.minimum(full_end, end_n)
    else:
        end_n = seq_k
        full_end = seq_k // BLOCK_N * BLOCK_N

    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    dq = dq_key_tiles(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        rows, offs_n, offs_d, seq_k, causal_offset, qk_scale, 0, full_end,
        HEAD_DIM, BLOCK_N, CAUSAL, False, PAD_D, DOT_PRECISION,
    )
    dq = dq_key_tiles(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        rows, offs_n, offs_d, seq_k, causal_offset, qk_scale, full_end, end_n,
        HEAD_DIM, BLOCK_N, CAUSAL, True, PAD_D, DOT_PRECISION,
    )
    dq = dq * scale
    store_tile(tile_pointers(dq_ptr + batch * stride_dqb + head * stride_dqh, rows, stride_dqm, offs_d, stride_dqd),
               dq.to(dq_ptr.dtype.element_ty), rows, seq_q, offs_d, HEAD_DIM, PAD_D)


dkdv_tuned = autotuned(attention_backward_dkdv_kernel, "backward_dkdv")
dq_tuned = autotuned(attention_backward_dq_kernel, "backward_dq")


def preprocess_launch(o, do, delta, block_m):
    """delta = rowsum(dO ∘ O), ``block_m`` rows a program."""
    batch, heads, seq_q, head_dim = o.shape
    return KernelLaunch(
        attention_backward_preprocess_kernel,
        (triton.cdiv(seq_q, block_m), batch * heads),
        (o, do, delta, *strides(o), *strides(do), heads, seq_q),
        dict(HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded(head_dim), BLOCK_M=block_m),
        4,
        1,
    )


def dkdv_args(q, k, v, do, lse, delta, dk, dv, scale):
    """The dK/dV kernel's run-time arguments, in order."""
    heads, seq_q = q.shape[1], q.shape[2]
    kv_heads, seq_k = k.shape[1], k.shape[2]
    return (
        q, k, v, do, lse, delta, dk, dv, *strides(q), *strides(k), *strides(v), *strides(do), *strides(lse),
        *strides(dk), *strides(dv), heads, kv_heads, heads // kv_heads, seq_q, seq_k, float(scale),
        seq_bucket(seq_q), seq_bucket(seq_k),
    )


def dq_args(q, k, v, do, lse, delta, dq, scale):
    """The dQ kernel's run-time arguments, in order."""
    heads, seq_q = q.shape[1], q.shape[2]
    kv_heads, seq_k = k.shape[1], k.shape[2]
    return (
        q, k, v, do, lse, delta, dq, *strides(q), *strides(k), *strides(v), *strides(do), *strides(lse),
        *strides(dq), heads, heads // kv_heads, seq_q, seq_k, float(scale), seq_bucket(seq_q), seq_bucket(seq_k),
    )


def attention_backward(do, q, k, v, o, lse, causal, scale):
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    dq = torch.empty((batch, heads, seq_q, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, kv_heads, seq_k, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, kv_heads, seq_k, head_dim), dtype=v.dtype, device=v.device)
    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    constexprs = shape_constexprs(head_dim, q.dtype, causal)
    with on_device(q):
        preprocess_rows = PREPROCESS_BLOCK_M if not interpreting() else INTERPRETER_BLOCKS["BLOCK_M"]
        preprocess_launch(o, do, delta, preprocess_rows).run()
        launch(
            dkdv_tuned, attention_backward_dkdv_kernel,
            lambda meta: (triton.cdiv(seq_k, meta["BLOCK_N"]), batch * kv_heads),
            dkdv_args(q, k, v, do, lse, delta, dk, dv, scale), constexprs,
        )
        launch(
            dq_tuned, attention_backward_dq_kernel,
            lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads),
            dq_args(q, k, v, do, lse, delta, dq, scale), constexprs,
        )
    return dq, dk, dv
