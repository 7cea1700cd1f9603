"""The Triton add+LayerNorm / RMSNorm forward: one pass reads ``x`` and ``residual`` once and
writes ``h = x + residual`` and ``y = (h - mean) * rstd * weight + bias`` (RMS mode: no mean, no
bias), with the statistics in fp32. Rows up to ``FORWARD_REGISTER_ROW`` columns live in registers;
wider rows are processed in column blocks, re-reading their inputs from L2. Narrow rows are packed
several to a program so each one moves enough bytes to hide memory latency."""

import torch
import triton
import triton.language as tl

from fastgpt.contract import residual_stream_dtype

from .add_layer_norm_configs import NUM_STAGES, as_rows, forward_config
from .launch import KernelLaunch


@triton.jit
def _sum_as_stored(x_rows, residual_rows, cols, mask, H_DTYPE: tl.constexpr):
    """x + residual in fp32, rounded to h's dtype: the statistics are those of h as stored, so the
    backward's xhat (recomputed from the stored h) matches the forward's (exactly, for N = 1)."""
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return (x + residual).to(H_DTYPE)


@triton.jit
def add_layer_norm_forward_kernel(
    x_ptr,  # (rows, N) x, row stride stride_x_row, unit column stride
    residual_ptr,  # (rows, N) residual (x's dtype or fp32), row stride stride_residual_row, unit column stride
    weight_ptr,  # (N,) element stride stride_weight (any, 0 when expanded); read only when HAS_WEIGHT
    bias_ptr,  # (N,) element stride stride_bias; read only when HAS_BIAS
    y_ptr,  # (rows, N) contiguous, x's dtype: the normalized output
    h_ptr,  # (rows, N) contiguous, h's dtype: x + residual
    mean_ptr,  # (rows,) fp32: the mean of each row of h (zeros in RMS mode)
    rstd_ptr,  # (rows,) fp32: 1 / sqrt(variance + eps) (RMS mode: 1 / sqrt(mean(h²) + eps))
    stride_x_row,
    stride_residual_row,
    stride_weight,
    stride_bias,
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
            y = y * tl.load(weight_ptr + cols * stride_weight, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + cols * stride_bias, mask=col_mask, other=0.0).to(tl.float32)[None, :]
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
                y = y * tl.load(weight_ptr + cols * stride_weight, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                y = y + tl.load(bias_ptr + cols * stride_bias, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


def forward_launch(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32):
    """The outputs y, h as (rows, N) and mean, rstd as (rows,), and the launch that fills them."""
    N = x.shape[-1]
    x_rows, residual_rows = as_rows(x, N), as_rows(residual, N)
    n_rows = x_rows.shape[0]
    h_dtype = residual_stream_dtype(x.dtype, residual_in_fp32)
    y = torch.empty((n_rows, N), dtype=x.dtype, device=x.device)
    h = torch.empty((n_rows, N), dtype=h_dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    config = forward_config(n_rows, N)
    warps = config.pop("num_warps")
    launch = KernelLaunch(
        add_layer_norm_forward_kernel,
        (triton.cdiv(n_rows, config["ROWS_PER_PROGRAM"]),),
        (
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
            weight.stride(0) if weight is not None else 1,
            bias.stride(0) if bias is not None else 1,
            n_rows,
            N,
            eps,
        ),
        dict(IS_RMS_NORM=is_rms_norm, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **config),
        warps,
        NUM_STAGES,
    )
    return (y, h, mean, rstd), launch


def add_layer_norm_forward(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32):
    (y, h, mean, rstd), launch = forward_launch(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32)
    launch.run()
    lead = x.shape[:-1]
    return y.view(x.shape), h.view(x.shape), mean.view(lead), rstd.view(lead)
