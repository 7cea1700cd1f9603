"""Fused residual add + LayerNorm / RMSNorm in Triton, forward and backward.

Forward: one pass reads ``x`` and ``residual`` once and writes ``h = x + residual`` and
``y = (h - mean) * rstd * weight + bias`` (RMS mode: no mean, no bias). Backward: the gradient
of ``y`` (and of ``h`` for pre-norm blocks) gives ``dx`` (= ``dresidual``); ``dweight``/``dbias``
come from fp32 partial sums, one row of a ``(programs, N)`` buffer per program, reduced once
afterwards: deterministic, no atomics, no locks. ``xhat`` is recomputed from ``h``, ``mean`` and
``rstd``, so ``y`` is never saved.

Rows up to ``_FORWARD_REGISTER_ROW`` (forward) / ``_BACKWARD_REGISTER_ROW`` (backward) columns
live in registers for the whole computation; wider rows are processed in column blocks (the
forward re-reads its inputs from L2; the backward first computes each row's two dot products in a
small kernel, then splits the columns across programs). Narrow rows are packed several to a
program so each one moves enough bytes to hide memory latency.
"""

import functools

import torch
import triton
import triton.language as tl

from fastgpt.kernels import device_unsupported_reason, interpreting
from fastgpt.contract import residual_stream_dtype

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HIDDEN = 65536  # the widest row tested; wider works the same way (column loops) but is untested

_FORWARD_REGISTER_ROW = 16384  # widest padded row the forward holds in registers without spilling
_BACKWARD_REGISTER_ROW = 8192  # same for the backward, which also holds dweight/dbias accumulators
_COLUMN_BLOCK = 4096  # column block of the wide-row paths
_TILE_ELEMENTS = 4096  # elements per program-iteration tile: narrow rows are packed up to this
_ELEMENTS_PER_THREAD = 8  # 16-byte accesses for 16-bit dtypes
_PROGRAMS_PER_SM = 2  # backward grid: a small multiple of the SM count
_INTERPRETER_PROGRAMS = 4  # backward grid under the CPU interpreter, where programs run one by one
_NUM_STAGES = 1  # no compiler pipelining: the backward prefetches its next tile by hand (AOT specs match)


@triton.jit
def _sum_as_stored(x_rows, residual_rows, cols, mask, H_DTYPE: tl.constexpr):
    """x + residual in fp32, rounded to h's dtype: the statistics are those of h as stored, so the
    backward's xhat (recomputed from the stored h) matches the forward's (exactly, for N = 1)."""
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return (x + residual).to(H_DTYPE)


@triton.jit
def _add_layer_norm_forward_kernel(
    x_ptr,  # (rows, N) x, row stride stride_x_row, unit column stride
    residual_ptr,  # (rows, N) residual (x's dtype or fp32), row stride stride_residual_row, unit column stride
    weight_ptr,  # (N,) read only when HAS_WEIGHT
    bias_ptr,  # (N,) read only when HAS_BIAS
    y_ptr,  # (rows, N) contiguous, x's dtype: the normalized output
    h_ptr,  # (rows, N) contiguous, h's dtype: x + residual
    mean_ptr,  # (rows,) fp32: the mean of each row of h (zeros in RMS mode)
    rstd_ptr,  # (rows,) fp32: 1 / sqrt(variance + eps) (RMS mode: 1 / sqrt(mean(h²) + eps))
    stride_x_row,
    stride_residual_row,
    n_rows,
    N,
    eps,
    IS_RMS_NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # >= N when ROW_IN_REGISTERS, else the column block of the loops
    ROWS_PER_PROGRAM: tl.constexpr,
    ROW_IN_REGISTERS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)  # rows * stride may exceed 2**31
    x_rows = x_ptr + rows[:, None] * stride_x_row
    residual_rows = residual_ptr + rows[:, None] * stride_residual_row
    h_rows = h_ptr + rows[:, None] * N
    y_rows = y_ptr + rows[:, None] * N

    if ROW_IN_REGISTERS:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        h = _sum_as_stored(x_rows, residual_rows, cols, mask, h_ptr.dtype.element_ty)
        tl.store(h_rows + cols[None, :], h, mask=mask)
        h = h.to(tl.float32)
        if IS_RMS_NORM:
            mean = tl.zeros([ROWS_PER_PROGRAM], dtype=tl.float32)
            centered = h
        else:
            mean = tl.sum(h, axis=1) / N
            centered = tl.where(mask, h - mean[:, None], 0.0)  # padding must not add mean² to the variance
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / N + eps)
        y = centered * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Wide rows: pass 1 writes h and sums it, pass 2 sums squared deviations from the exact
        # mean (no E[h²] - mean² cancellation), pass 3 writes y. Passes 2 and 3 recompute h from
        # x and residual (now in L2): the h another thread of this program stored is not ordered
        # before this thread's reads without a barrier.
        first_sum = tl.zeros([ROWS_PER_PROGRAM, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < N)[None, :]
            h = _sum_as_stored(x_rows, residual_rows, cols, mask, h_ptr.dtype.element_ty)
            tl.store(h_rows + cols[None, :], h, mask=mask)
            h = h.to(tl.float32)
            first_sum += h * h if IS_RMS_NORM else h
        if IS_RMS_NORM:
            mean = tl.zeros([ROWS_PER_PROGRAM], dtype=tl.float32)
            variance = tl.sum(first_sum, axis=1) / N
        else:
            mean = tl.sum(first_sum, axis=1) / N
            squared_deviations = tl.zeros([ROWS_PER_PROGRAM, BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = row_mask[:, None] & (cols < N)[None, :]
                h = _sum_as_stored(x_rows, residual_rows, cols, mask, h_ptr.dtype.element_ty).to(tl.float32)
                centered = tl.where(mask, h - mean[:, None], 0.0)
                squared_deviations += centered * centered
            variance = tl.sum(squared_deviations, axis=1) / N
        rstd = tl.rsqrt(variance + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_mask = cols < N
            mask = row_mask[:, None] & col_mask[None, :]
            h = _sum_as_stored(x_rows, residual_rows, cols, mask, h_ptr.dtype.element_ty).to(tl.float32)
            y = (h - mean[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                y = y * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                y = y + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _row_dots_kernel(
    dy_ptr,  # (rows, N) gradient of y, row stride stride_dy_row, unit column stride
    h_ptr,  # (rows, N) h, row stride stride_h_row, unit column stride
    weight_ptr,  # (N,) read only when HAS_WEIGHT
    mean_ptr,  # (rows,) fp32, not read in RMS mode
    rstd_ptr,  # (rows,) fp32
    row_dots_ptr,  # (rows, 2) fp32 out: mean over the row of (dy·weight)·xhat, and of dy·weight
    stride_dy_row,
    stride_h_row,
    N,
    IS_RMS_NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The two row reductions of the backward, for rows too wide to hold in registers."""
    row = tl.program_id(0).to(tl.int64)
    rstd = tl.load(rstd_ptr + row)
    mean = 0.0 if IS_RMS_NORM else tl.load(mean_ptr + row)
    dot_xhat = tl.zeros([BLOCK_N], dtype=tl.float32)
    dot_ones = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        h = tl.load(h_ptr + row * stride_h_row + cols, mask=mask, other=0.0).to(tl.float32)
        wdy = tl.load(dy_ptr + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            wdy *= tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dot_xhat += wdy * ((h - mean) * rstd)  # wdy is 0 on padding
        dot_ones += wdy
    tl.store(row_dots_ptr + 2 * row, tl.sum(dot_xhat, axis=0) / N)
    tl.store(row_dots_ptr + 2 * row + 1, tl.sum(dot_ones, axis=0) / N)


@triton.jit
def _load_tile(ptr, rows, stride_row, row_mask, cols, col_mask):
    """The (rows, cols) tile of a matrix with unit column stride, zeros outside the masks, in its own dtype."""
    offsets = rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
    return tl.load(ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _add_layer_norm_backward_kernel(
    dy_ptr,  # (rows, N) gradient of y, row stride stride_dy_row, unit column stride
    dh_ptr,  # (rows, N) gradient of h, row stride stride_dh_row, unit column stride; read only when HAS_DH
    h_ptr,  # (rows, N) h, row stride stride_h_row, unit column stride
    weight_ptr,  # (N,) read only when HAS_WEIGHT
    mean_ptr,  # (rows,) fp32, not read in RMS mode
    rstd_ptr,  # (rows,) fp32
    row_dots_ptr,  # (rows, 2) fp32 from _row_dots_kernel; read only when PRECOMPUTED_ROW_DOTS
    dx_ptr,  # (rows, N) contiguous, h's dtype: gradient of x (and of residual)
    dweight_partial_ptr,  # (programs, N) fp32: row p = sum of dy·xhat over program p's rows; when HAS_WEIGHT
    dbias_partial_ptr,  # (programs, N) fp32: row p = sum of dy over program p's rows; when HAS_BIAS
    stride_dy_row,
    stride_dh_row,
    stride_h_row,
    n_rows,
    N,
    rows_per_program,  # a multiple of ROWS_PER_TILE
    IS_RMS_NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DH: tl.constexpr,
    PRECOMPUTED_ROW_DOTS: tl.constexpr,  # columns split over program_id(1): the row reductions come precomputed
    BLOCK_N: tl.constexpr,  # >= N unless PRECOMPUTED_ROW_DOTS
    ROWS_PER_TILE: tl.constexpr,
    PREFETCH_NEXT_TILE: tl.constexpr,  # worth its registers for small tiles (few elements per thread)
):
    """Program (p, c) walks rows [p·rows_per_program, (p+1)·rows_per_program) of column block c,
    keeping its dweight/dbias partial sums in registers until the end."""
    program = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dweight_sum = tl.zeros([ROWS_PER_TILE, BLOCK_N], dtype=tl.float32)
    dbias_sum = tl.zeros([ROWS_PER_TILE, BLOCK_N], dtype=tl.float32)
    first_row = program * rows_per_program
    end_row = tl.minimum(first_row + rows_per_program, n_rows)
    if PREFETCH_NEXT_TILE:
        first_rows = first_row + tl.arange(0, ROWS_PER_TILE)
        h_next = _load_tile(h_ptr, first_rows, stride_h_row, first_rows < end_row, cols, col_mask)
        dy_next = _load_tile(dy_ptr, first_rows, stride_dy_row, first_rows < end_row, cols, col_mask)
    for tile_row in range(first_row, end_row, ROWS_PER_TILE):
        rows = tile_row + tl.arange(0, ROWS_PER_TILE)
        row_mask = rows < end_row
        if PREFETCH_NEXT_TILE:
            # issue the next tile's loads before this tile's reductions so memory latency overlaps them
            h, dy = h_next, dy_next
            next_rows = rows + ROWS_PER_TILE
            h_next = _load_tile(h_ptr, next_rows, stride_h_row, next_rows < end_row, cols, col_mask)
            dy_next = _load_tile(dy_ptr, next_rows, stride_dy_row, next_rows < end_row, cols, col_mask)
        else:
            h = _load_tile(h_ptr, rows, stride_h_row, row_mask, cols, col_mask)
            dy = _load_tile(dy_ptr, rows, stride_dy_row, row_mask, cols, col_mask)
        h, dy = h.to(tl.float32), dy.to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        if IS_RMS_NORM:
            xhat = h * rstd[:, None]
        else:
            xhat = (h - tl.load(mean_ptr + rows, mask=row_mask, other=0.0)[:, None]) * rstd[:, None]
        # padding holds dy = 0, so it adds nothing below even where xhat is not 0
        wdy = dy * weight[None, :] if HAS_WEIGHT else dy
        if PRECOMPUTED_ROW_DOTS:
            mean_wdy_xhat = tl.load(row_dots_ptr + 2 * rows, mask=row_mask, other=0.0)
            mean_wdy = tl.load(row_dots_ptr + 2 * rows + 1, mask=row_mask, other=0.0)
        else:
            mean_wdy_xhat = tl.sum(wdy * xhat, axis=1) / N
            mean_wdy = tl.sum(wdy, axis=1) / N
        if IS_RMS_NORM:
            dx = (wdy - xhat * mean_wdy_xhat[:, None]) * rstd[:, None]
        else:
            dx = (wdy - xhat * mean_wdy_xhat[:, None] - mean_wdy[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += _load_tile(dh_ptr, rows, stride_dh_row, row_mask, cols, col_mask).to(tl.float32)
        dx_offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
        if HAS_WEIGHT:
            dweight_sum += dy * xhat
        if HAS_BIAS:
            dbias_sum += dy
    if HAS_WEIGHT:
        tl.store(dweight_partial_ptr + program * N + cols, tl.sum(dweight_sum, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(dbias_partial_ptr + program * N + cols, tl.sum(dbias_sum, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------- launch heuristics


def _num_warps(tile_elements, max_warps=16):
    """Enough warps that each thread handles about _ELEMENTS_PER_THREAD elements of the tile."""
    return max(1, min(max_warps, tile_elements // (32 * _ELEMENTS_PER_THREAD)))


def _rows_per_tile(block_n, n_rows):
    """Pack narrow rows so that a tile has about _TILE_ELEMENTS elements (never more rows than exist)."""
    return max(1, min(_TILE_ELEMENTS // block_n, triton.next_power_of_2(n_rows)))


def forward_config(n_rows, N):
    """Launch parameters of the forward kernel for ``n_rows`` rows of ``N`` columns."""
    block_n = triton.next_power_of_2(N)
    if block_n <= _FORWARD_REGISTER_ROW:
        rows_per_program = _rows_per_tile(block_n, n_rows)
        # the widest rows get up to 32 warps so that a 16384-wide row stays at 16 values per thread
        warps = _num_warps(rows_per_program * block_n, max_warps=32 if block_n >= 16384 else 16)
        return dict(BLOCK_N=block_n, ROWS_PER_PROGRAM=rows_per_program, ROW_IN_REGISTERS=True, num_warps=warps)
    return dict(BLOCK_N=_COLUMN_BLOCK, ROWS_PER_PROGRAM=1, ROW_IN_REGISTERS=False, num_warps=_num_warps(_COLUMN_BLOCK))


def backward_config(n_rows, N, num_programs_target):
    """Launch parameters of the backward kernel: tile, column split and rows per program."""
    block_n = triton.next_power_of_2(N)
    if block_n <= _BACKWARD_REGISTER_ROW:
        rows_per_tile, column_blocks, split = _rows_per_tile(block_n, n_rows), 1, False
    else:
        block_n, rows_per_tile, column_blocks, split = _COLUMN_BLOCK, 1, triton.cdiv(N, _COLUMN_BLOCK), True
    row_programs = max(1, num_programs_target // column_blocks)
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, row_programs), rows_per_tile) * rows_per_tile
    return dict(
        BLOCK_N=block_n,
        ROWS_PER_TILE=rows_per_tile,
        PRECOMPUTED_ROW_DOTS=split,
        PREFETCH_NEXT_TILE=rows_per_tile * block_n <= _TILE_ELEMENTS,
        num_warps=_num_warps(rows_per_tile * block_n),
        rows_per_program=rows_per_program,
        grid=(triton.cdiv(n_rows, rows_per_program), column_blocks),
    )


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _backward_programs_target(device):
    """How many programs the backward spreads its rows over: enough to fill every SM."""
    if interpreting():
        return _INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _PROGRAMS_PER_SM * _multiprocessor_count(index)


# ----------------------------------------------------------------------------- host functions


def _as_rows(t, N):
    """``t`` as a (rows, N) matrix with unit column stride: a view when the layout allows, else a copy."""
    rows = t.reshape(-1, N)
    return rows if rows.stride(1) == 1 or N == 1 else rows.contiguous()


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


def add_layer_norm_forward(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32):
    N = x.shape[-1]
    x_rows, residual_rows = _as_rows(x, N), _as_rows(residual, N)
    n_rows = x_rows.shape[0]
    h_dtype = residual_stream_dtype(x.dtype, residual_in_fp32)
    y = torch.empty((n_rows, N), dtype=x.dtype, device=x.device)
    h = torch.empty((n_rows, N), dtype=h_dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    config = forward_config(n_rows, N)
    grid = (triton.cdiv(n_rows, config["ROWS_PER_PROGRAM"]),)
    _add_layer_norm_forward_kernel[grid](
        x_rows,
        residual_rows,
        weight if weight is not None else x_rows,  # never read: HAS_WEIGHT is False
        bias if bias is not None else x_rows,  # never read: HAS_BIAS is False
        y,
        h,
        mean,
        rstd,
        x_rows.stride(0),
        residual_rows.stride(0),
        n_rows,
        N,
        eps,
        IS_RMS_NORM=is_rms_norm,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        num_stages=_NUM_STAGES,
        **config,
    )
    lead = x.shape[:-1]
    return y.view(x.shape), h.view(x.shape), mean.view(lead), rstd.view(lead)


def add_layer_norm_backward(dy, dh, h, weight, bias, mean, rstd, is_rms_norm):
    N = h.shape[-1]
    h_rows, dy_rows = _as_rows(h, N), _as_rows(dy, N)
    dh_rows = _as_rows(dh, N) if dh is not None else h_rows  # h_rows: never read when HAS_DH is False
    n_rows = h_rows.shape[0]
    mean_rows, rstd_rows = mean.reshape(n_rows).contiguous(), rstd.reshape(n_rows).contiguous()
    config = backward_config(n_rows, N, _backward_programs_target(h.device))
    grid = config.pop("grid")
    row_programs = grid[0]
    dx = torch.empty((n_rows, N), dtype=h.dtype, device=h.device)
    partial_shape = (row_programs, N)
    dweight_partial = torch.empty(partial_shape, dtype=torch.float32, device=h.device) if weight is not None else None
    dbias_partial = torch.empty(partial_shape, dtype=torch.float32, device=h.device) if bias is not None else None
    row_dots = None
    if config["PRECOMPUTED_ROW_DOTS"]:
        row_dots = torch.empty((n_rows, 2), dtype=torch.float32, device=h.device)
        _row_dots_kernel[(n_rows,)](
            dy_rows,
            h_rows,
            weight if weight is not None else h_rows,  # never read: HAS_WEIGHT is False
            mean_rows,
            rstd_rows,
            row_dots,
            dy_rows.stride(0),
            h_rows.stride(0),
            N,
            IS_RMS_NORM=is_rms_norm,
            HAS_WEIGHT=weight is not None,
            BLOCK_N=_COLUMN_BLOCK,
            num_warps=_num_warps(_COLUMN_BLOCK),
            num_stages=_NUM_STAGES,
        )
    _add_layer_norm_backward_kernel[grid](
        dy_rows,
        dh_rows,
        h_rows,
        weight if weight is not None else h_rows,  # never read: HAS_WEIGHT is False
        mean_rows,
        rstd_rows,
        row_dots if row_dots is not None else rstd_rows,  # never read: PRECOMPUTED_ROW_DOTS is False
        dx,
        dweight_partial if dweight_partial is not None else dx,  # never written: HAS_WEIGHT is False
        dbias_partial if dbias_partial is not None else dx,  # never written: HAS_BIAS is False
        dy_rows.stride(0),
        dh_rows.stride(0),
        h_rows.stride(0),
        n_rows,
        N,
        IS_RMS_NORM=is_rms_norm,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_DH=dh is not None,
        num_stages=_NUM_STAGES,
        **config,
    )
    dweight = dweight_partial.sum(0).to(weight.dtype) if weight is not None else None
    dbias = dbias_partial.sum(0).to(bias.dtype) if bias is not None else None
    return dx.view(h.shape), dweight, dbias


# ----------------------------------------------------------------------------- ahead-of-time compile specs

_AOT_HIDDEN_SIZES = (768, 1024, 4096, 8192, 16384)
_AOT_ROWS = 8192  # enough rows that the narrow-row packing reaches its full tile
_AOT_PROGRAMS_TARGET = _PROGRAMS_PER_SM * 132  # H100 SXM
_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _aot_spec(name, kernel, pointers, scalars, constexprs, num_warps):
    """One spec for tests/triton_aot.py. ``pointers``: {arg: torch dtype}; ``scalars``: {arg: (type, value)}.

    ``attrs`` marks the pointers and the scalars that are multiples of 16 as 16-divisible, as
    Triton's launcher specializes them at run time (that is what makes 16-byte accesses possible).
    """
    signature, attrs = {}, {}
    for index, arg in enumerate(kernel.arg_names):
        if arg in pointers:
            signature[arg] = "*" + _TRITON_TYPE[pointers[arg]]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg in scalars:
            kind, value = scalars[arg]
            signature[arg] = kind
            if kind == "i32" and value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "constexpr"
    return dict(name=name, kernel=kernel, signature=signature, constexprs=constexprs, attrs=attrs,
                num_warps=num_warps, num_stages=_NUM_STAGES)


def aot_compile_specs():
    """The forward and backward kernels in the configurations the launch heuristics pick for
    hidden sizes 768..16384: LayerNorm in bf16 and fp32 with weight and bias and a gradient into h,
    and RMSNorm in bf16 with weight and a float32 residual stream."""
    f32, bf16 = torch.float32, torch.bfloat16
    variants = (  # name, x dtype, h dtype, is_rms_norm, has_bias
        ("layernorm_bf16", bf16, bf16, False, True),
        ("layernorm_fp32", f32, f32, False, True),
        ("rmsnorm_bf16_residual_fp32", bf16, f32, True, False),
    )
    specs = []
    for N in _AOT_HIDDEN_SIZES:
        for variant, x_dtype, h_dtype, rms, has_bias in variants:
            forward = forward_config(_AOT_ROWS, N)
            warps = forward.pop("num_warps")
            specs.append(_aot_spec(
                f"forward_{variant}_N{N}",
                _add_layer_norm_forward_kernel,
                dict(x_ptr=x_dtype, residual_ptr=h_dtype, weight_ptr=x_dtype, bias_ptr=x_dtype, y_ptr=x_dtype,
                     h_ptr=h_dtype, mean_ptr=f32, rstd_ptr=f32),
                dict(stride_x_row=("i32", N), stride_residual_row=("i32", N), n_rows=("i32", _AOT_ROWS),
                     N=("i32", N), eps=("fp32", 1e-5)),
                dict(IS_RMS_NORM=rms, HAS_WEIGHT=True, HAS_BIAS=has_bias, **forward),
                warps,
            ))
            backward = backward_config(_AOT_ROWS, N, _AOT_PROGRAMS_TARGET)
            warps, rows_per_program = backward.pop("num_warps"), backward.pop("rows_per_program")
            backward.pop("grid")
            if backward["PRECOMPUTED_ROW_DOTS"]:
                specs.append(_aot_spec(
                    f"row_dots_{variant}_N{N}",
                    _row_dots_kernel,
                    dict(dy_ptr=x_dtype, h_ptr=h_dtype, weight_ptr=x_dtype, mean_ptr=f32, rstd_ptr=f32,
                         row_dots_ptr=f32),
                    dict(stride_dy_row=("i32", N), stride_h_row=("i32", N), N=("i32", N)),
                    dict(IS_RMS_NORM=rms, HAS_WEIGHT=True, BLOCK_N=_COLUMN_BLOCK),
                    _num_warps(_COLUMN_BLOCK),
                ))
            specs.append(_aot_spec(
                f"backward_{variant}_N{N}",
                _add_layer_norm_backward_kernel,
                dict(dy_ptr=x_dtype, dh_ptr=h_dtype, h_ptr=h_dtype, weight_ptr=x_dtype, mean_ptr=f32, rstd_ptr=f32,
                     row_dots_ptr=f32, dx_ptr=h_dtype, dweight_partial_ptr=f32, dbias_partial_ptr=f32),
                dict(stride_dy_row=("i32", N), stride_dh_row=("i32", N), stride_h_row=("i32", N),
                     n_rows=("i32", _AOT_ROWS), N=("i32", N), rows_per_program=("i32", rows_per_program)),
                dict(IS_RMS_NORM=rms, HAS_WEIGHT=True, HAS_BIAS=has_bias, HAS_DH=True, **backward),
                warps,
            ))
    return specs
