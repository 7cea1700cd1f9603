"""The Triton add+LayerNorm / RMSNorm backward: the gradient of ``y`` (and of ``h`` for pre-norm
blocks) gives ``dx`` (= ``dresidual``); ``dweight``/``dbias`` come from fp32 partial sums, one row
of a ``(programs, N)`` buffer per program, reduced once afterwards: deterministic, no atomics, no
locks. ``xhat`` is recomputed from ``h``, ``mean`` and ``rstd``, so ``y`` is never saved. Rows up
to ``BACKWARD_REGISTER_ROW`` columns live in registers; for wider rows a small kernel first
computes each row's two dot products, then the columns are split across programs."""

import torch
import triton
import triton.language as tl

from .add_layer_norm_configs import (
    COLUMN_BLOCK, NUM_STAGES, as_rows, backward_config, backward_programs_target, num_warps,
)
from .launch import KernelLaunch
from .tiles import load_tile, tile_pointers


@triton.jit
def row_dots_kernel(
    dy_ptr,  # (rows, N) gradient of y, row stride stride_dy_row, unit column stride
    h_ptr,  # (rows, N) h, row stride stride_h_row, unit column stride
    weight_ptr,  # (N,) element stride stride_weight (any, 0 when expanded); read only when HAS_WEIGHT
    mean_ptr,  # (rows,) fp32, not read in RMS mode
    rstd_ptr,  # (rows,) fp32
    row_dots_ptr,  # (rows, 2) fp32 out: mean over the row of (dy·weight)·xhat, and of dy·weight
    stride_dy_row,
    stride_h_row,
    stride_weight,
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
            wdy *= tl.load(weight_ptr + cols * stride_weight, mask=mask, other=0.0).to(tl.float32)
        dot_xhat += wdy * ((h - mean) * rstd)  # wdy is 0 on padding
        dot_ones += wdy
    tl.store(row_dots_ptr + 2 * row, tl.sum(dot_xhat, axis=0) / N)
    tl.store(row_dots_ptr + 2 * row + 1, tl.sum(dot_ones, axis=0) / N)


@triton.jit
def _load_rows(ptr, rows, stride_row, end_row, cols, N):
    """Rows [rows] (< end_row) of a (rows, N) matrix with unit column stride, zeros outside."""
    return load_tile(tile_pointers(ptr, rows.to(tl.int64), stride_row, cols, 1), rows, end_row, cols, N, True, True)


@triton.jit
def add_layer_norm_backward_kernel(
    dy_ptr,  # (rows, N) gradient of y, row stride stride_dy_row, unit column stride
    dh_ptr,  # (rows, N) gradient of h, row stride stride_dh_row, unit column stride; read only when HAS_DH
    h_ptr,  # (rows, N) h, row stride stride_h_row, unit column stride
    weight_ptr,  # (N,) element stride stride_weight (any, 0 when expanded); read only when HAS_WEIGHT
    mean_ptr,  # (rows,) fp32, not read in RMS mode
    rstd_ptr,  # (rows,) fp32
    row_dots_ptr,  # (rows, 2) fp32 from row_dots_kernel; read only when PRECOMPUTED_ROW_DOTS
    dx_ptr,  # (rows, N) contiguous, h's dtype: gradient of x (and of residual)
    dweight_partial_ptr,  # (programs, N) fp32: row p = sum of dy·xhat over program p's rows; when HAS_WEIGHT
    dbias_partial_ptr,  # (programs, N) fp32: row p = sum of dy over program p's rows; when HAS_BIAS
    stride_dy_row,
    stride_dh_row,
    stride_h_row,
    stride_weight,
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
        weight = tl.load(weight_ptr + cols * stride_weight, mask=col_mask, other=0.0).to(tl.float32)
    dweight_sum = tl.zeros([ROWS_PER_TILE, BLOCK_N], dtype=tl.float32)
    dbias_sum = tl.zeros([ROWS_PER_TILE, BLOCK_N], dtype=tl.float32)
    first_row = program * rows_per_program
    end_row = tl.minimum(first_row + rows_per_program, n_rows)
    if PREFETCH_NEXT_TILE:
        first_rows = first_row + tl.arange(0, ROWS_PER_TILE)
        h_next = _load_rows(h_ptr, first_rows, stride_h_row, end_row, cols, N)
        dy_next = _load_rows(dy_ptr, first_rows, stride_dy_row, end_row, cols, N)
    for tile_row in range(first_row, end_row, ROWS_PER_TILE):
        rows = tile_row + tl.arange(0, ROWS_PER_TILE)
        row_mask = rows < end_row
        if PREFETCH_NEXT_TILE:
            # issue the next tile's loads before this tile's reductions so memory latency overlaps them
            h, dy = h_next, dy_next
            next_rows = rows + ROWS_PER_TILE
            h_next = _load_rows(h_ptr, next_rows, stride_h_row, end_row, cols, N)
            dy_next = _load_rows(dy_ptr, next_rows, stride_dy_row, end_row, cols, N)
        else:
            h = _load_rows(h_ptr, rows, stride_h_row, end_row, cols, N)
            dy = _load_rows(dy_ptr, rows, stride_dy_row, end_row, cols, N)
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
            dx += _load_rows(dh_ptr, rows, stride_dh_row, end_row, cols, N).to(tl.float32)
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


def backward_launches(dy, dh, h, weight, bias, mean, rstd, is_rms_norm, programs_target):
    """dx as (rows, N), the fp32 dweight and dbias partials (None without weight / bias), and the
    launches that fill them: the row-dots kernel first when the columns are split."""
    N = h.shape[-1]
    h_rows, dy_rows = as_rows(h, N), as_rows(dy, N)
    dh_rows = as_rows(dh, N) if dh is not None else h_rows  # h_rows: never read when HAS_DH is False
    n_rows = h_rows.shape[0]
    mean_rows, rstd_rows = mean.reshape(n_rows).contiguous(), rstd.reshape(n_rows).contiguous()
    config = backward_config(n_rows, N, programs_target)
    grid, warps, rows_per_program = config.pop("grid"), config.pop("num_warps"), config.pop("rows_per_program")
    dx = torch.empty((n_rows, N), dtype=h.dtype, device=h.device)
    partial_shape = (grid[0], N)
    dweight_partial = torch.empty(partial_shape, dtype=torch.float32, device=h.device) if weight is not None else None
    dbias_partial = torch.empty(partial_shape, dtype=torch.float32, device=h.device) if bias is not None else None
    weight_stride = weight.stride(0) if weight is not None else 1
    launches, row_dots = [], None
    if config["PRECOMPUTED_ROW_DOTS"]:
        row_dots = torch.empty((n_rows, 2), dtype=torch.float32, device=h.device)
        launches.append(KernelLaunch(
            row_dots_kernel,
            (n_rows,),
            (
                dy_rows,
                h_rows,
                weight if weight is not None else h_rows,  # never read: HAS_WEIGHT is False
                mean_rows,
                rstd_rows,
                row_dots,
                dy_rows.stride(0),
                h_rows.stride(0),
                weight_stride,
                N,
            ),
            dict(IS_RMS_NORM=is_rms_norm, HAS_WEIGHT=weight is not None, BLOCK_N=COLUMN_BLOCK),
            num_warps(COLUMN_BLOCK),
            NUM_STAGES,
        ))
    launches.append(KernelLaunch(
        add_layer_norm_backward_kernel,
        grid,
        (
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
            weight_stride,
            n_rows,
            N,
            rows_per_program,
        ),
        dict(IS_RMS_NORM=is_rms_norm, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_DH=dh is not None,
             **config),
        warps,
        NUM_STAGES,
    ))
    return (dx, dweight_partial, dbias_partial), launches


def add_layer_norm_backward(dy, dh, h, weight, bias, mean, rstd, is_rms_norm):
    (dx, dweight_partial, dbias_partial), launches = backward_launches(
        dy, dh, h, weight, bias, mean, rstd, is_rms_norm, backward_programs_target(h.device)
    )
    for launch in launches:
        launch.run()
    dweight = dweight_partial.sum(0).to(weight.dtype) if weight is not None else None
    dbias = dbias_partial.sum(0).to(bias.dtype) if bias is not None else None
    return dx.view(h.shape), dweight, dbias
