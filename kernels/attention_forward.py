"""The Triton attention forward, FlashAttention-2 style: each program owns ``BLOCK_M`` query rows
of one head and streams the key/value tiles of its kv head past them with an online softmax
(running max and sum in fp32, ``exp2`` with ``log2(e)`` and the scale folded into its argument),
so the ``seq_q × seq_k`` score matrix never exists. It saves ``lse``, the natural-log
log-sum-exp of each query row.

A query block visits only the key tiles that intersect what its rows may see ([lo, hi) from the
causal mask and the sliding window, so a window's cost grows with the window, not the sequence),
and masks only the tiles that cross an edge of that range (a window's left edge, the diagonal, the
end of the keys): the unmasked run is one software-pipelined loop, and the masked tiles after it
(the diagonal, the end of the keys) are straight-line steps before it, so a program has one
pipeline prologue; under a window, and in fp32, the masked tiles on either side of the run are a
second loop (``forward_visible_tiles`` says why). Variants are
compile-time switches: CAUSAL and WINDOW (runtime ``window_left``/``window_right``, the host
turning an unbounded side into a bound no key reaches), SOFTCAP (``softcap · tanh(score · scale /
softcap)`` before the mask), and VARLEN (packed sequences: a program reads its sequence's offsets
from ``cu_seqlens_q``/``cu_seqlens_k``). The key-tile loops and the epilogue are shared with the
decode kernel.
"""

import triton
import triton.language as tl

from .attention_configs import autotuned, launch, seq_bucket, shape_constexprs
from .tiles import load_tile, store_tile, tile_pointers

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2(e))
LN2 = tl.constexpr(0.6931471805599453)  # a log2-domain lse times ln(2) is the natural-log lse


@triton.jit
def tanh_gap(x):
    """(1 - tanh(y)) / 2 = 1 / (1 + exp(2y)) in fp32, given x = 2y·log2(e) (libdevice's tanh does not
    run in Triton's interpreter): then tanh(y) = 1 - 2·gap and 1 - tanh²(y) = 4·gap·(1 - gap). One
    exp2 and one reciprocal per score, no sign or range branches (exp2 overflowing to inf gives gap
    0, tanh 1), so soft-capped tiles keep few values live. Near y = 0 the result is exact to an
    absolute fp32 rounding of 1, i.e. the capped score to one of the cap: no worse than the
    rounding of an uncapped score of that size."""
    return 1.0 / (1.0 + tl.math.exp2(x))


@triton.jit
def sequence_span(cu_seqlens_ptr, batch, seq_len, VARLEN: tl.constexpr):
    """(first row, length) of sequence ``batch``: from the packed offsets when VARLEN, else (0, seq_len)."""
    start = 0
    length = seq_len
    if VARLEN:
        first = tl.load(cu_seqlens_ptr + batch)
        length = tl.load(cu_seqlens_ptr + batch + 1) - first
        start = first.to(tl.int64)
    return start, length


@triton.jit
def window_edges(off, window_left, window_right, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """(right_edge, left_edge): query row i sees keys j with i + left_edge <= j <= i + right_edge
    (bottom-right aligned: ``off = seq_k - seq_q``); a side the mask leaves open is never tested."""
    right_edge = off
    if WINDOW and not CAUSAL:
        right_edge = off + window_right
    left_edge = off
    if WINDOW:
        left_edge = off - window_left
    return right_edge, left_edge


@triton.jit
def key_range(first_row, last_row, seq_k, right_edge, left_edge, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              WINDOW: tl.constexpr):
    """[lo, hi): the keys rows first_row..last_row may see, lo rounded down to a key tile."""
    hi = seq_k
    if CAUSAL or WINDOW:
        hi = tl.minimum(tl.maximum(last_row + right_edge + 1, 0), seq_k)
    lo = 0
    if WINDOW:
        lo = tl.minimum(tl.maximum(first_row + left_edge, 0), seq_k) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def unmasked_tiles(lo, hi, first_row, last_row, seq_k, right_edge, left_edge, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[full_lo, full_hi) within [lo, hi) (lo a multiple of BLOCK_N): the key tiles every row of
    first_row..last_row sees whole, which need no mask. The tiles before it cross the window's left
    edge, those after it the diagonal (or the window's right edge) or the end of the keys."""
    full_lo = lo
    if WINDOW:  # the first tile whose first key the last row still sees
        full_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last_row + left_edge, 0), BLOCK_N) * BLOCK_N, lo), hi)
    full_end = seq_k
    if CAUSAL or WINDOW:  # up to the last key the first row sees
        full_end = tl.minimum(tl.maximum(first_row + right_edge + 1, 0), seq_k)
    full_hi = tl.minimum(tl.maximum(full_end // BLOCK_N * BLOCK_N, full_lo), hi)
    return full_lo, full_hi


@triton.jit
def visible_keys(rows, cols, seq_k, right_edge, left_edge, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """The (rows, cols) mask of keys each row sees. A causal window's two edges are one unsigned
    test, 0 <= col - (row + left_edge) <= right_edge - left_edge (a negative difference wraps past
    it), and no test of the end of the keys, which a causal row before seq_q never passes (rows
    past it are never stored): one value per row and one compare per score instead of two and three.
    A window without the mask clips its right edge to the last key per row instead."""
    if WINDOW and CAUSAL:
        width = (right_edge - left_edge).to(tl.uint32, bitcast=True)
        visible = (cols[None, :] - (rows[:, None] + left_edge)).to(tl.uint32, bitcast=True) <= width
    elif WINDOW:
        last = tl.minimum(rows + right_edge, seq_k - 1)
        visible = (cols[None, :] >= rows[:, None] + left_edge) & (cols[None, :] <= last[:, None])
    else:
        visible = cols[None, :] < seq_k
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + right_edge)
    return visible


@triton.jit
def forward_tile(
    acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    rows, offs_n, offs_d, seq_k, right_edge, left_edge, score_scale, gap_scale, tile_start,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr, PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over the key tile at ``tile_start``; a MASKED tile crosses an edge
    of the visible range or the end of the keys. ``score_scale`` (> 0) turns a score (its soft-capped
    tanh under SOFTCAP, then the cap) into the log2 domain; ``row_max`` is in that domain and stays
    -inf until the row has seen a key."""
    cols = tile_start + offs_n
    k = load_tile(tile_pointers(k_base, cols, stride_kn, offs_d, stride_kd), cols, seq_k, offs_d, HEAD_DIM,
                  MASKED, PAD_D)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # unscaled
    if SOFTCAP:
        scores = 1.0 - 2.0 * tanh_gap(scores * gap_scale)  # tanh(y); the cap is score_scale
    if MASKED:  # -inf times a positive scale stays -inf
        scores = tl.where(visible_keys(rows, cols, seq_k, right_edge, left_edge, CAUSAL, WINDOW), scores,
                          float("-inf"))
    # score_scale > 0, so the scaled max is the max times the scale; the scale then folds into
    # exp2's argument (one FMA per score instead of a multiply and a subtract)
    new_max = tl.maximum(row_max, tl.max(scores, 1) * score_scale)  # -inf while a row has seen no key
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # such a row: exp2 gives 0, not NaN
    probs = tl.math.exp2(scores * score_scale - shift[:, None])
    correction = tl.math.exp2(row_max - shift)
    row_sum = row_sum * correction + tl.sum(probs, 1)
    acc = acc * correction[:, None]
    # V only now: a step outside the loop loads through registers, where K and V together spilled
    # (the 128x64 tile on sm_80: 16 B); the loop's software pipelining moves both loads anyway
    v = load_tile(tile_pointers(v_base, cols, stride_vn, offs_d, stride_vd), cols, seq_k, offs_d, HEAD_DIM,
                  MASKED, PAD_D)
    acc = tl.dot(probs.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def score_scales(qk_scale, softcap, SOFTCAP: tl.constexpr):
    """(score_scale, gap_scale) of ``forward_tile`` from ``qk_scale`` (scale · log2(e), > 0: the host
    negates q for a negative scale and zeroes it for a zero one)."""
    if SOFTCAP:
        gap_scale = 2.0 * qk_scale / softcap  # 2y·log2(e) for y = score · scale / softcap
        score_scale = softcap * LOG2E  # softcap · tanh(y) in the log2 domain
    else:
        gap_scale = qk_scale  # unused
        score_scale = qk_scale
    return score_scale, gap_scale


@triton.jit
def forward_key_tiles(
    acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    rows, offs_n, offs_d, seq_k, right_edge, left_edge, score_scale, gap_scale, start_n, end_n, skip_from, skip,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, MASKED: tl.constexpr, SKIPS: tl.constexpr, PAD_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``forward_tile`` over key tiles [start_n, end_n) (start_n a multiple of BLOCK_N) in one
    software-pipelined loop, or with SKIPS the tiles from ``skip_from`` on moved ``skip`` keys
    further (a multiple of BLOCK_N: one loop over the tiles on both sides of a run)."""
    for step_start in range(start_n, end_n, BLOCK_N):
        tile_start = step_start
        if SKIPS:
            tile_start = step_start + tl.where(step_start >= skip_from, skip, 0)
        acc, row_max, row_sum = forward_tile(
            acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            rows, offs_n, offs_d, seq_k, right_edge, left_edge, score_scale, gap_scale, tile_start,
            HEAD_DIM, CAUSAL, WINDOW, SOFTCAP, MASKED, PAD_D, DOT_PRECISION,
        )
    return acc, row_max, row_sum


@triton.jit
def forward_visible_tiles(
    acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    rows, first_row, last_row, offs_n, offs_d, seq_k, right_edge, left_edge, qk_scale, softcap, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The key tiles [lo, hi) of rows first_row..last_row (at most BLOCK_M rows apart): the unmasked
    run in one software-pipelined loop, and the masked tiles after it (the diagonal, the end of the
    keys) peeled out of any loop, before the run: straight-line steps, each skipped from ``hi`` on,
    so the program has one pipeline prologue and drain.

    How many: a tile needs the mask only if some row's last visible key lies in it or before its
    end, and the rows' last visible keys span at most BLOCK_M - 1 keys; with the run's end rounded
    down to a tile, at most BLOCK_M - 1 + BLOCK_N - 1 keys follow it, for any alignment of seq_k to
    seq_q (rows that see no key included) and in the decode's splits (each starts on a tile). The
    causal steps are PEEL_N = BLOCK_N / 2 keys wide (16 at least): a step outside the loop takes
    its K and V through registers, not cp.async, and full-width steps spilled the 128x64 tile on
    sm_80 (24 B at head dim 128); without the mask one full-width step covers the ragged end.

    Not one loop that tests each tile: a branch inside the loop hides the chain of the two dot
    products from Triton 3.9 (the probabilities then pass through shared memory) or, around the whole
    step, stops the software pipelining of the K/V loads. Peeled before the run rather than after
    it: after it, Triton keeps Q in registers (the dot's operand layout) through the whole loop.
    Two cases keep the masked tiles in a second software-pipelined loop after the run: WINDOW, whose
    masked tiles lie on both sides of the run (twice the peeled steps; one loop that skips the run
    rather than one per side: a third loop spilled the largest tiles at head dim 128, 56-72 B of
    stack), and fp32 ("tf32x3" products), whose peeled steps spilled every tile (0.5-3 KB of stack)."""
    score_scale, gap_scale = score_scales(qk_scale, softcap, SOFTCAP)
    full_lo, full_hi = unmasked_tiles(lo, hi, first_row, last_row, seq_k, right_edge, left_edge, BLOCK_N, CAUSAL,
                                      WINDOW)
    PEELED: tl.constexpr = not WINDOW and DOT_PRECISION != "tf32x3"
    if PEELED:
        PEEL_N: tl.constexpr = max(BLOCK_N // 2, 16) if CAUSAL else BLOCK_N
        STEPS: tl.constexpr = (BLOCK_M + BLOCK_N - 2 + PEEL_N - 1) // PEEL_N if CAUSAL else 1
        for step in tl.static_range(STEPS):
            step_start = full_hi + step * PEEL_N
            if step_start < hi:
                acc, row_max, row_sum = forward_tile(
                    acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    rows, tl.arange(0, PEEL_N), offs_d, seq_k, right_edge, left_edge, score_scale, gap_scale,
                    step_start, HEAD_DIM, CAUSAL, WINDOW, SOFTCAP, True, PAD_D, DOT_PRECISION,
                )
    acc, row_max, row_sum = forward_key_tiles(
        acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        rows, offs_n, offs_d, seq_k, right_edge, left_edge, score_scale, gap_scale, full_lo, full_hi, 0, 0,
        HEAD_DIM, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, False, False, PAD_D, DOT_PRECISION,
    )
    if WINDOW:  # [lo, full_lo) then [full_hi, hi)
        acc, row_max, row_sum = forward_key_tiles(
            acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            rows, offs_n, offs_d, seq_k, right_edge, left_edge, score_scale, gap_scale, lo, hi - (full_hi - full_lo),
            full_lo, full_hi - full_lo, HEAD_DIM, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, True, True, PAD_D, DOT_PRECISION,
        )
    elif not PEELED:
        acc, row_max, row_sum = forward_key_tiles(
            acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            rows, offs_n, offs_d, seq_k, right_edge, left_edge, score_scale, gap_scale, full_hi, hi, 0, 0,
            HEAD_DIM, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, True, False, PAD_D, DOT_PRECISION,
        )
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
    q_ptr,  # (batch, heads, seq_q, head_dim), any strides; VARLEN: (heads, total_q, head_dim) view, batch stride 0
    k_ptr,  # (batch, kv_heads, seq_k, head_dim), any strides; VARLEN: likewise (kv_heads, total_k, head_dim)
    v_ptr,  # like k
    o_ptr,  # like q, output
    lse_ptr,  # fp32 output, (batch, heads, seq_q) or VARLEN (heads, total_q); rows contiguous
    cu_seqlens_q_ptr,  # VARLEN: int32 (batch + 1,) offsets of the sequences' queries; else None
    cu_seqlens_k_ptr,  # VARLEN: int32 (batch + 1,) offsets of their keys; else None
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lseb, stride_lseh,
    heads, group_size, seq_q, seq_k, scale,  # VARLEN: seq_q, seq_k are the longest sequences
    window_left, window_right, softcap,  # used only under WINDOW / SOFTCAP; window sides >= 0
    seq_q_bucket, seq_k_bucket,  # only the autotuner's key (power-of-two buckets of seq_q, seq_k)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m_block = tl.program_id(0)
    if CAUSAL:
        m_block = tl.cdiv(seq_q, BLOCK_M) - 1 - m_block  # the last query blocks see the most keys: launch them first
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
    q_base = q_ptr + batch * stride_qb + head * stride_qh + q_start * stride_qm
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh + k_start * stride_kn
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh + k_start * stride_vn
    q = load_tile(tile_pointers(q_base, rows, stride_qm, offs_d, stride_qd), rows, seq_q, offs_d, HEAD_DIM, True, PAD_D)

    first_row = m_block * BLOCK_M
    last_row = tl.minimum(first_row + BLOCK_M, seq_q) - 1
    right_edge, left_edge = window_edges(seq_k - seq_q, window_left, window_right, CAUSAL, WINDOW)
    lo, hi = key_range(first_row, last_row, seq_k, right_edge, left_edge, BLOCK_N, CAUSAL, WINDOW)

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, row_max, row_sum = forward_visible_tiles(
        acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        rows, first_row, last_row, offs_n, offs_d, seq_k, right_edge, left_edge, scale * LOG2E, softcap, lo, hi,
        HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, PAD_D, DOT_PRECISION,
    )

    out, lse2 = normalized_rows(acc, row_max, row_sum)
    tl.store(lse_ptr + batch * stride_lseb + head * stride_lseh + q_start + rows, lse2 * LN2, mask=rows < seq_q)
    o_base = o_ptr + batch * stride_ob + head * stride_oh + q_start * stride_om
    store_tile(tile_pointers(o_base, rows, stride_om, offs_d, stride_od), out.to(o_ptr.dtype.element_ty),
               rows, seq_q, offs_d, HEAD_DIM, PAD_D)


forward_tuned = autotuned(attention_forward_kernel, "forward")


def forward_args(q, k, v, o, lse, scale, variant):
    """The forward kernel's run-time arguments, in order, for (batch, heads, seq, head_dim) tensors or
    packed sequences' views (``variant.cu_seqlens_q`` set: batch strides 0, seq lengths the longest)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    seq_q, seq_k = variant.lengths(q, k)
    return (
        q, k, v, o, lse, variant.cu_seqlens_q, variant.cu_seqlens_k,
        *variant.strides(q), *variant.strides(k), *variant.strides(v), *variant.strides(o),
        *variant.strides(lse)[:2], heads, heads // kv_heads, seq_q, seq_k, float(scale),
        *variant.window_args(seq_q, seq_k), float(variant.softcap), seq_bucket(seq_q), seq_bucket(seq_k),
    )


def launch_forward(q, k, v, o, lse, scale, variant):
    """Write o and lse with the forward kernel (any number of queries)."""
    batch, heads = variant.batch(q), q.shape[1]
    seq_q, _ = variant.lengths(q, k)

    def grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

    launch(forward_tuned, attention_forward_kernel, grid, forward_args(q, k, v, o, lse, scale, variant),
           shape_constexprs(q.shape[-1], q.dtype, variant))
