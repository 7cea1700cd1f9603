"""The Triton attention backward, deterministic (no atomics): a preprocess computes
``delta = rowsum(dO ∘ O)``; one kernel owns a key block and loops over query blocks — and over
every query head of its GQA group, so dK and dV are summed in registers — and another owns a query
block and loops over key blocks for dQ. Probabilities are recomputed from the forward's ``lse``.
Both scan only the tiles the causal mask and the sliding window leave visible and mask only the
tiles that cross an edge (as the forward does: a window's masked tiles on both sides of the
unmasked run in one loop); a soft cap is differentiated exactly (``1 - tanh²`` of the capped
score, recomputed, folded into P before the dot products).

GEMMs per (query tile, key tile) pair: the dK/dV kernel does 4 — Sᵀ = K·Qᵀ, dV += Pᵀ·dO,
dPᵀ = V·dOᵀ, dK += dSᵀ·Q — and the dQ kernel 3 — S = Q·Kᵀ, dP = dO·Vᵀ, dQ += dS·K — so 7, where
one fused kernel needs 5. S and dP are recomputed in the dQ kernel because the alternatives cost
more: FlashAttention-2's fused backward adds each key block's dQ share into global memory with
atomics (a summation order that changes from run to run: not deterministic, and fp32 dQ traffic of
seq_k / BLOCK_N read-modify-writes per row), and writing dS from the dK/dV kernel for the dQ kernel
to read would store a seq_q × seq_k matrix per head, which attention's memory bound is meant to
avoid. The dK/dV kernel also owns a GQA group's heads, so dK and dV need no reduction across
programs.
"""

import torch
import triton
import triton.language as tl

from . import interpreting
from .attention_configs import (
    INTERPRETER_BLOCKS, autotuned, head_dim_padded, launch, seq_bucket, shape_constexprs, strides,
)
from .attention_forward import (
    LOG2E, key_range, sequence_span, tanh_gap, unmasked_tiles, visible_keys, window_edges,
)
from .launch import KernelLaunch
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
    cols, offs_m, offs_d, seq_q, right_edge, left_edge, qk_scale, softcap, start_m, end_m, skip_from, skip,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, MASKED: tl.constexpr, SKIPS: tl.constexpr, PAD_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV of one key block over query tiles [start_m, end_m), or with SKIPS the tiles
    from ``skip_from`` on moved ``skip`` rows further (as ``forward_key_tiles``), in transposed
    (key-major) form; MASKED tiles cross an edge of the window, the diagonal or the end of the queries."""
    if SOFTCAP:
        gap_scale = 2.0 * qk_scale / softcap  # tanh_gap's argument per unscaled score (see the forward)
        cap = softcap * LOG2E
    for step_start in range(start_m, end_m, BLOCK_M):
        tile_start = step_start
        if SKIPS:
            tile_start = step_start + tl.where(step_start >= skip_from, skip, 0)
        rows = tile_start + offs_m
        q = load_tile(tile_pointers(q_base, rows, stride_qm, offs_d, stride_qd), rows, seq_q, offs_d, HEAD_DIM,
                      MASKED, PAD_D)
        do = load_tile(tile_pointers(do_base, rows, stride_dom, offs_d, stride_dod), rows, seq_q, offs_d, HEAD_DIM,
                       MASKED, PAD_D)
        lse = load_log2_lse(lse_base + rows * stride_lsem, rows, seq_q, MASKED)
        if SOFTCAP:
            lse = lse - cap  # exp2(cap · tanh - lse) = exp2(-2cap · gap - (lse - cap)): one FMA a score
        if MASKED:
            delta = tl.load(delta_base + rows, mask=rows < seq_q, other=0.0)
        else:
            delta = tl.load(delta_base + rows)
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (keys, queries), unscaled
        if SOFTCAP:
            gap_t = tanh_gap(scores_t * gap_scale)
            probs_t = tl.math.exp2(gap_t * (-2.0 * cap) - lse[None, :])
        else:
            probs_t = tl.math.exp2(scores_t * qk_scale - lse[None, :])  # padding rows have lse +inf: 0
        if MASKED and (CAUSAL or WINDOW):
            visible_t = cols[:, None] <= rows[None, :] + right_edge
            if WINDOW:
                visible_t = visible_t & (cols[:, None] >= rows[None, :] + left_edge)
            probs_t = tl.where(visible_t, probs_t, 0.0)
        dv = tl.dot(probs_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if SOFTCAP:  # d/ds of softcap · tanh(s · scale / softcap) is scale · (1 - tanh²) (scale comes at
            # the end): folded into P, so the tanh is not live across the second dot
            probs_t = probs_t * (gap_t * (4.0 - 4.0 * gap_t))
        dprobs_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dscores_t = probs_t * (dprobs_t - delta[None, :])
        dk = tl.dot(dscores_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attention_backward_dkdv_kernel(
    q_ptr,  # (batch, heads, seq_q, head_dim), any strides; VARLEN: (heads, total_q, head_dim) view, batch stride 0
    k_ptr,  # (batch, kv_heads, seq_k, head_dim), any strides; VARLEN: likewise
    v_ptr,  # like k
    do_ptr,  # like q
    lse_ptr,  # fp32, natural log, (batch, heads, seq_q) or VARLEN (heads, total_q), any strides
    delta_ptr,  # fp32, like lse, rows contiguous
    dk_ptr,  # like k, output
    dv_ptr,  # like k, output
    cu_seqlens_q_ptr,  # VARLEN: int32 (batch + 1,) offsets of the sequences' queries; else None
    cu_seqlens_k_ptr,  # VARLEN: int32 (batch + 1,) offsets of their keys; else None
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lseb, stride_lseh, stride_lsem,
    stride_deltab, stride_deltah,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    heads, kv_heads, group_size, seq_q, seq_k, scale,  # VARLEN: seq_q, seq_k are the longest sequences
    window_left, window_right, softcap,  # used only under WINDOW / SOFTCAP; window sides >= 0
    seq_q_bucket, seq_k_bucket,  # only the autotuner's key (power-of-two buckets of seq_q, seq_k)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n_block = tl.program_id(0)
    batch_kv_head = tl.program_id(1)
    batch = batch_kv_head // kv_heads
    kv_head = (batch_kv_head % kv_heads).to(tl.int64)
    q_start, seq_q = sequence_span(cu_seqlens_q_ptr, batch, seq_q, VARLEN)
    k_start, seq_k = sequence_span(cu_seqlens_k_ptr, batch, seq_k, VARLEN)
    if VARLEN:
        if n_block * BLOCK_N >= seq_k:  # a sequence shorter than the longest
            return
    batch = batch.to(tl.int64)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PADDED

    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh + k_start * stride_kn
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh + k_start * stride_vn
    k = load_tile(tile_pointers(k_base, cols, stride_kn, offs_d, stride_kd), cols, seq_k, offs_d, HEAD_DIM, True, PAD_D)
    v = load_tile(tile_pointers(v_base, cols, stride_vn, offs_d, stride_vd), cols, seq_k, offs_d, HEAD_DIM, True, PAD_D)

    # the query tiles that see some key of this block: query i sees key j when
    # i + left_edge <= j <= i + right_edge, so i >= first_col - right_edge and i <= last_col - left_edge
    first_col = n_block * BLOCK_N
    last_col = tl.minimum(first_col + BLOCK_N, seq_k) - 1
    right_edge, left_edge = window_edges(seq_k - seq_q, window_left, window_right, CAUSAL, WINDOW)
    start_m = 0
    end_m = seq_q
    if CAUSAL or WINDOW:
        start_m = tl.minimum(tl.maximum(first_col - right_edge, 0), seq_q) // BLOCK_M * BLOCK_M
    if WINDOW:
        end_m = tl.minimum(tl.maximum(last_col - left_edge + 1, 0), seq_q)
    # query tiles [full_start, full_end) see the whole block and lie inside seq_q: no mask. Before
    # them a tile's first row misses the block's last key (the diagonal); after them its last row
    # misses the block's first key (a window's left edge) or passes the end of the queries.
    full_start = start_m
    if CAUSAL or WINDOW:
        full_start = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last_col - right_edge, 0), BLOCK_M) * BLOCK_M, start_m),
                                end_m)
    full_end = seq_q // BLOCK_M * BLOCK_M
    if WINDOW:
        full_end = tl.minimum(tl.maximum(first_col - left_edge + 1, 0) // BLOCK_M * BLOCK_M, full_end)
    full_end = tl.minimum(tl.maximum(full_end, full_start), end_m)

    qk_scale = scale * LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], dtype=tl.float32)
    # every query head of the GQA group adds into the same dK, dV: summed here, no atomics
    for head_in_group in range(0, group_size):
        head = kv_head * group_size + head_in_group
        q_base = q_ptr + batch * stride_qb + head * stride_qh + q_start * stride_qm
        do_base = do_ptr + batch * stride_dob + head * stride_doh + q_start * stride_dom
        lse_base = lse_ptr + batch * stride_lseb + head * stride_lseh + q_start * stride_lsem
        delta_base = delta_ptr + batch * stride_deltab + head * stride_deltah + q_start
        if CAUSAL and not WINDOW:  # the diagonal tiles, then the run
            dk, dv = dkdv_query_tiles(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_lsem,
                cols, offs_m, offs_d, seq_q, right_edge, left_edge, qk_scale, softcap, start_m, full_start, 0, 0,
                HEAD_DIM, BLOCK_M, CAUSAL, WINDOW, SOFTCAP, True, False, PAD_D, DOT_PRECISION,
            )
        dk, dv = dkdv_query_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_lsem,
            cols, offs_m, offs_d, seq_q, right_edge, left_edge, qk_scale, softcap, full_start, full_end, 0, 0,
            HEAD_DIM, BLOCK_M, CAUSAL, WINDOW, SOFTCAP, False, False, PAD_D, DOT_PRECISION,
        )
        if WINDOW:  # the masked tiles on both sides of the run in one loop (as the forward)
            dk, dv = dkdv_query_tiles(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_lsem,
                cols, offs_m, offs_d, seq_q, right_edge, left_edge, qk_scale, softcap,
                start_m, end_m - (full_end - full_start), full_start, full_end - full_start,
                HEAD_DIM, BLOCK_M, CAUSAL, WINDOW, SOFTCAP, True, True, PAD_D, DOT_PRECISION,
            )
        else:
            dk, dv = dkdv_query_tiles(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_lsem,
                cols, offs_m, offs_d, seq_q, right_edge, left_edge, qk_scale, softcap, full_end, end_m, 0, 0,
                HEAD_DIM, BLOCK_M, CAUSAL, WINDOW, SOFTCAP, True, False, PAD_D, DOT_PRECISION,
            )

    dk = dk * scale
    dk_base = dk_ptr + batch * stride_dkb + kv_head * stride_dkh + k_start * stride_dkn
    dv_base = dv_ptr + batch * stride_dvb + kv_head * stride_dvh + k_start * stride_dvn
    store_tile(tile_pointers(dk_base, cols, stride_dkn, offs_d, stride_dkd), dk.to(dk_ptr.dtype.element_ty),
               cols, seq_k, offs_d, HEAD_DIM, PAD_D)
    store_tile(tile_pointers(dv_base, cols, stride_dvn, offs_d, stride_dvd), dv.to(dv_ptr.dtype.element_ty),
               cols, seq_k, offs_d, HEAD_DIM, PAD_D)


@triton.jit
def dq_key_tiles(
    dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    rows, offs_n, offs_d, seq_k, right_edge, left_edge, qk_scale, softcap, start_n, end_n, skip_from, skip,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, MASKED: tl.constexpr, SKIPS: tl.constexpr, PAD_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ of one query block over key tiles [start_n, end_n), or with SKIPS the tiles from
    ``skip_from`` on moved ``skip`` keys further (as ``forward_key_tiles``), unscaled (times scale at
    the end); MASKED tiles are the ones the forward masks."""
    if SOFTCAP:
        gap_scale = 2.0 * qk_scale / softcap  # tanh_gap's argument per unscaled score (see the forward)
        lse = lse - softcap * LOG2E  # exp2(cap · tanh - lse) = exp2(-2cap · gap - (lse - cap))
        cap = softcap * LOG2E
    for step_start in range(start_n, end_n, BLOCK_N):
        tile_start = step_start
        if SKIPS:
            tile_start = step_start + tl.where(step_start >= skip_from, skip, 0)
        cols = tile_start + offs_n
        k = load_tile(tile_pointers(k_base, cols, stride_kn, offs_d, stride_kd), cols, seq_k, offs_d, HEAD_DIM,
                      MASKED, PAD_D)
        v = load_tile(tile_pointers(v_base, cols, stride_vn, offs_d, stride_vd), cols, seq_k, offs_d, HEAD_DIM,
                      MASKED, PAD_D)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SOFTCAP:
            gap = tanh_gap(scores * gap_scale)
            probs = tl.math.exp2(gap * (-2.0 * cap) - lse[:, None])
        else:
            probs = tl.math.exp2(scores * qk_scale - lse[:, None])  # rows that see no key have lse +inf: 0
        if MASKED:
            probs = tl.where(visible_keys(rows, cols, seq_k, right_edge, left_edge, CAUSAL, WINDOW), probs, 0.0)
        if SOFTCAP:  # P ∘ (1 - tanh²), as in the dK/dV kernel
            probs = probs * (gap * (4.0 - 4.0 * gap))
        dprobs = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        dscores = probs * (dprobs - delta[:, None])
        dq = tl.dot(dscores.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def attention_backward_dq_kernel(
    q_ptr,  # (batch, heads, seq_q, head_dim), any strides; VARLEN: (heads, total_q, head_dim) view, batch stride 0
    k_ptr,  # (batch, kv_heads, seq_k, head_dim), any strides; VARLEN: likewise
    v_ptr,  # like k
    do_ptr,  # like q
    lse_ptr,  # fp32, natural log, (batch, heads, seq_q) or VARLEN (heads, total_q), any strides
    delta_ptr,  # fp32, like lse, rows contiguous
    dq_ptr,  # like q, output
    cu_seqlens_q_ptr,  # VARLEN: int32 (batch + 1,) offsets of the sequences' queries; else None
    cu_seqlens_k_ptr,  # VARLEN: int32 (batch + 1,) offsets of their keys; else None
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lseb, stride_lseh, stride_lsem,
    stride_deltab, stride_deltah,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    heads, group_size, seq_q, seq_k, scale,  # VARLEN: seq_q, seq_k are the longest sequences
    window_left, window_right, softcap,  # used only under WINDOW / SOFTCAP; window sides >= 0
    seq_q_bucket, seq_k_bucket,  # only the autotuner's key (power-of-two buckets of seq_q, seq_k)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m_block = tl.program_id(0)
    if CAUSAL:
        m_block = tl.cdiv(seq_q, BLOCK_M) - 1 - m_block  # heaviest query blocks first
    batch_head = tl.program_id(1)
    batch = batch_head // heads
    head = batch_head % heads
    kv_head = (head // group_size).to(tl.int64)
    head = head.to(tl.int64)
    q_start, seq_q = sequence_span(cu_seqlens_q_ptr, batch, seq_q, VARLEN)
    k_start, seq_k = sequence_span(cu_seqlens_k_ptr, batch, seq_k, VARLEN)
    if VARLEN:
        if m_block * BLOCK_M >= seq_q:  # a sequence shorter than the longest
            return
    batch = batch.to(tl.int64)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PADDED

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    q = load_tile(tile_pointers(q_ptr + batch * stride_qb + head * stride_qh + q_start * stride_qm, rows, stride_qm,
                                offs_d, stride_qd), rows, seq_q, offs_d, HEAD_DIM, True, PAD_D)
    do = load_tile(tile_pointers(do_ptr + batch * stride_dob + head * stride_doh + q_start * stride_dom, rows,
                                 stride_dom, offs_d, stride_dod), rows, seq_q, offs_d, HEAD_DIM, True, PAD_D)
    lse = load_log2_lse(lse_ptr + batch * stride_lseb + head * stride_lseh + (q_start + rows) * stride_lsem, rows,
                        seq_q, True)
    delta = tl.load(delta_ptr + batch * stride_deltab + head * stride_deltah + q_start + rows, mask=rows < seq_q,
                    other=0.0)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh + k_start * stride_kn
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh + k_start * stride_vn

    # the forward's key ranges and masks
    first_row = m_block * BLOCK_M
    last_row = tl.minimum(first_row + BLOCK_M, seq_q) - 1
    right_edge, left_edge = window_edges(seq_k - seq_q, window_left, window_right, CAUSAL, WINDOW)
    lo, hi = key_range(first_row, last_row, seq_k, right_edge, left_edge, BLOCK_N, CAUSAL, WINDOW)

    full_lo, full_hi = unmasked_tiles(lo, hi, first_row, last_row, seq_k, right_edge, left_edge, BLOCK_N, CAUSAL,
                                      WINDOW)
    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    # under WINDOW the masked tiles [lo, full_lo) and [full_hi, hi) in one loop as the forward does,
    # but before the run: after it, values kept for the masked loop spilled (8-24 B at head dim 128)
    if WINDOW:
        dq = dq_key_tiles(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            rows, offs_n, offs_d, seq_k, right_edge, left_edge, qk_scale, softcap, lo, hi - (full_hi - full_lo),
            full_lo, full_hi - full_lo, HEAD_DIM, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, True, True, PAD_D, DOT_PRECISION,
        )
    dq = dq_key_tiles(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        rows, offs_n, offs_d, seq_k, right_edge, left_edge, qk_scale, softcap, full_lo, full_hi, 0, 0,
        HEAD_DIM, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, False, False, PAD_D, DOT_PRECISION,
    )
    if not WINDOW:
        dq = dq_key_tiles(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            rows, offs_n, offs_d, seq_k, right_edge, left_edge, qk_scale, softcap, full_hi, hi, 0, 0,
            HEAD_DIM, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, True, False, PAD_D, DOT_PRECISION,
        )
    dq = dq * scale
    store_tile(tile_pointers(dq_ptr + batch * stride_dqb + head * stride_dqh + q_start * stride_dqm, rows, stride_dqm,
                             offs_d, stride_dqd), dq.to(dq_ptr.dtype.element_ty), rows, seq_q, offs_d, HEAD_DIM, PAD_D)


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


def dkdv_args(q, k, v, do, lse, delta, dk, dv, scale, variant):
    """The dK/dV kernel's run-time arguments, in order (packed sequences as ``forward_args`` takes them)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    seq_q, seq_k = variant.lengths(q, k)
    return (
        q, k, v, do, lse, delta, dk, dv, variant.cu_seqlens_q, variant.cu_seqlens_k,
        *variant.strides(q), *variant.strides(k), *variant.strides(v), *variant.strides(do), *variant.strides(lse),
        *variant.strides(delta)[:2], *variant.strides(dk), *variant.strides(dv),
        heads, kv_heads, heads // kv_heads, seq_q, seq_k, float(scale),
        *variant.window_args(seq_q, seq_k), float(variant.softcap), seq_bucket(seq_q), seq_bucket(seq_k),
    )


def dq_args(q, k, v, do, lse, delta, dq, scale, variant):
    """The dQ kernel's run-time arguments, in order."""
    heads, kv_heads = q.shape[1], k.shape[1]
    seq_q, seq_k = variant.lengths(q, k)
    return (
        q, k, v, do, lse, delta, dq, variant.cu_seqlens_q, variant.cu_seqlens_k,
        *variant.strides(q), *variant.strides(k), *variant.strides(v), *variant.strides(do), *variant.strides(lse),
        *variant.strides(delta)[:2], *variant.strides(dq), heads, heads // kv_heads, seq_q, seq_k, float(scale),
        *variant.window_args(seq_q, seq_k), float(variant.softcap), seq_bucket(seq_q), seq_bucket(seq_k),
    )


def launch_backward(do, q, k, v, o, lse, dq, dk, dv, scale, variant):
    """Write dq, dk, dv: (batch, heads, seq, head_dim) tensors, or packed sequences' (1, heads, total,
    head_dim) views with ``variant`` holding their offsets."""
    batch, heads, total_q, head_dim = q.shape
    kv_heads = k.shape[1]
    seq_q, seq_k = variant.lengths(q, k)
    sequences = variant.batch(q)
    delta = torch.empty((batch, heads, total_q), dtype=torch.float32, device=q.device)
    constexprs = shape_constexprs(head_dim, q.dtype, variant)
    preprocess_rows = PREPROCESS_BLOCK_M if not interpreting() else INTERPRETER_BLOCKS["BLOCK_M"]
    preprocess_launch(o, do, delta, preprocess_rows).run()
    launch(
        dkdv_tuned, attention_backward_dkdv_kernel,
        lambda meta: (triton.cdiv(seq_k, meta["BLOCK_N"]), sequences * kv_heads),
        dkdv_args(q, k, v, do, lse, delta, dk, dv, scale, variant), constexprs,
    )
    launch(
        dq_tuned, attention_backward_dq_kernel,
        lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), sequences * heads),
        dq_args(q, k, v, do, lse, delta, dq, scale, variant), constexprs,
    )
