"""The ``torch`` backend: torch's own kernels behind fastgpt's contract.

This is what a user runs without fastgpt (``F.scaled_dot_product_attention``, ``F.layer_norm``,
``F.rms_norm``), reached through the same ATen kernels those functions dispatch to, so that it
can stand in the registry beside the other backends: the model's baseline, a candidate for
``auto``, and a check that fastgpt's contract matches torch's numerics. The attention ops
used here return the log-sum-exp the contract asks for, which the public SDPA function hides.
A sliding window is an explicit mask (what a user of SDPA would pass), a packed batch runs one
sequence at a time; torch's kernels have no soft-capping, so this backend does not declare it.
"""

import math

import torch

from fastgpt.contract import (
    HALF_DTYPES,
    blind_rows,
    dtype_unsupported,
    residual_stream_dtype,
    varlen_backward_by_sequence,
    varlen_forward_by_sequence,
)

_LSE_ALIGNMENT_CUDA = 32  # torch's memory-efficient attention pads its log-sum-exp rows to this


# ----------------------------------------------------------------------------- attention


def attention_unsupported(q, k, v):
    if q.device.type not in ("cpu", "cuda"):
        return f"torch's attention kernels with a log-sum-exp run on cpu and cuda, not {q.device.type}"
    return dtype_unsupported(("q", q), ("k", k), ("v", v))


def _mask(seq_q, seq_k, causal, window, dtype, device, row_alignment=1):
    """(is_causal, additive mask) for torch's kernels, whose causal mask is aligned top-left:
    fastgpt's bottom-right mask is the same when seq_q == seq_k, none when one query sees every
    key, and an explicit mask otherwise (its rows padded to ``row_alignment`` elements); a
    sliding window is always an explicit mask."""
    if window is None:
        if not causal or seq_q == 1:
            return False, None
        if seq_q == seq_k:
            return True, None
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0
    padded = -(-seq_k // row_alignment) * row_alignment
    visible = torch.ones(seq_q, padded, dtype=torch.bool, device=device)
    if right >= 0:
        visible = visible.tril(seq_k - seq_q + right)
    if left >= 0:
        visible = visible.triu(seq_k - seq_q - left)
    mask = torch.zeros(seq_q, padded, dtype=dtype, device=device).masked_fill(~visible, -math.inf)
    return False, mask[:, :seq_k]


def _cuda_bias(q, k, causal, window):
    """(is_causal, attn_bias) for the memory-efficient kernel, which wants a bias per (batch, head)
    whose rows start 16-element aligned."""
    is_causal, mask = _mask(q.shape[2], k.shape[2], causal, window, q.dtype, q.device, row_alignment=16)
    return is_causal, None if mask is None else mask.expand(q.shape[0], q.shape[1], -1, -1)


# Rows that see no key are leading rows (contract.blind_rows); torch's kernels would give them NaN,
# so they are cut off and the rest, whose bottom-right mask is the same without them, runs alone.


def attention_forward(q, k, v, causal, scale, *, window=None):
    seq_q, seq_k = q.shape[2], k.shape[2]
    blind = blind_rows(seq_q, seq_k, causal, window)
    if blind == 0:
        o, lse = _forward(q, k, v, causal, scale, window)
        return o.contiguous(), lse[..., :seq_q].float().contiguous()
    o = q.new_zeros(q.shape)
    lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
    if blind < seq_q:
        o_seen, lse_seen = _forward(q[:, :, blind:], k, v, causal, scale, window)
        o[:, :, blind:] = o_seen
        lse[:, :, blind:] = lse_seen[..., : seq_q - blind]
    return o, lse


def _unit_stride_rows(t):
    """``t``, or a contiguous copy where torch's CPU flash kernel would read it wrong: it assumes
    a unit stride along the head dim and rows and heads that do not overlap in memory (an
    expanded or transposed view gives wrong outputs, not an error)."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    reach = 0  # the furthest element offset the smaller strides reach: a larger stride must pass it
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= reach:
            return t.contiguous()
        reach += stride * (size - 1)
    return t


def _forward(q, k, v, causal, scale, window):
    if q.device.type == "cpu":
        q, k, v = (_unit_stride_rows(t) for t in (q, k, v))
        is_causal, mask = _mask(q.shape[2], k.shape[2], causal, window, q.dtype, q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale
        )
    is_causal, bias = _cuda_bias(q, k, causal, window)
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    o, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, is_causal, scale=scale)
    return o, lse


def attention_backward(do, q, k, v, o, lse, causal, scale, *, window=None):
    seq_q, seq_k = q.shape[2], k.shape[2]
    blind = blind_rows(seq_q, seq_k, causal, window)
    if blind == seq_q:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    rows = slice(blind, None)
    dq_seen, dk, dv = _backward(
        do[:, :, rows], q[:, :, rows], k, v, o[:, :, rows], lse[:, :, rows], causal, scale, window
    )
    if blind == 0:
        return dq_seen, dk, dv
    dq = q.new_zeros(q.shape)
    dq[:, :, rows] = dq_seen
    return dq, dk, dv


def _backward(do, q, k, v, o, lse, causal, scale, window):
    if q.device.type == "cpu":
        do, q, k, v = (_unit_stride_rows(t) for t in (do, q, k, v))
        is_causal, mask = _mask(q.shape[2], k.shape[2], causal, window, q.dtype, q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, is_causal, attn_mask=mask, scale=scale
        )
    heads, kv_heads = q.shape[1], k.shape[1]
    is_causal, bias = _cuda_bias(q, k, causal, window)
    padded = -(-q.shape[2] // _LSE_ALIGNMENT_CUDA) * _LSE_ALIGNMENT_CUDA
    lse = torch.nn.functional.pad(lse, (0, padded - q.shape[2]))
    no_dropout_seed = torch.empty((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        do, q, _repeat_kv(k, heads), _repeat_kv(v, heads), bias, o, lse, no_dropout_seed, no_dropout_seed,
        0.0, [True, True, True, False], is_causal, scale=scale,
    )
    if kv_heads != heads:  # the query heads that shared a key/value head add up their gradients
        dk, dv = (t.unflatten(1, (kv_heads, heads // kv_heads)).sum(2) for t in (dk, dv))
    return dq, dk, dv


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, *, window=None):
    return varlen_forward_by_sequence(attention_forward, q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window=window)


def varlen_attention_backward(
    do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, *, window=None
):
    return varlen_backward_by_sequence(
        attention_backward, do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, causal, scale, window=window
    )


def _repeat_kv(t, heads):
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


# ----------------------------------------------------------------------------- add + LayerNorm


def add_layer_norm_unsupported(x, residual, weight, bias):
    if x.shape[-1] == 1:  # every row is its own mean: torch's backward multiplies rounding noise by 1/sqrt(eps)
        return "torch's layer_norm backward is inaccurate for a hidden size of 1"
    return dtype_unsupported(("x", x), ("residual", residual), ("weight", weight), ("bias", bias))


def _norm_dtype(h, weight, bias):
    """torch's norms take parameters in the input's dtype: compute in the wider of the two."""
    dtype = h.dtype
    for p in (weight, bias):
        if p is not None:
            dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def add_layer_norm_forward(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32):
    h_dtype = residual_stream_dtype(x.dtype, residual_in_fp32)
    # the sum is taken in h's dtype when that is wider (fp32 residual stream): no half rounding first
    h = torch.add(x.to(h_dtype), residual.to(h_dtype)) if h_dtype != x.dtype else torch.add(x, residual).to(h_dtype)
    h = h.contiguous()  # the contract's layout whatever x's (torch.add keeps a transposed x transposed)
    dtype = _norm_dtype(h, weight, bias)
    h_n, w, b = (None if t is None else t.to(dtype) for t in (h, weight, bias))
    n = [h.shape[-1]]
    if is_rms_norm:
        y, rstd = torch.ops.aten._fused_rms_norm(h_n, n, w, eps)
        mean = torch.zeros_like(rstd)
    else:
        y, mean, rstd = torch.ops.aten.native_layer_norm(h_n, n, w, b, eps)
    stats = tuple(s.squeeze(-1).to(torch.float32) for s in (mean, rstd))
    return y.to(x.dtype), h, *stats


def _layer_norm_stats_dtype(h):
    """The dtype torch's layer_norm keeps its mean and 1/std in: float32 for half precision on GPUs,
    the input's own dtype on the CPU."""
    return torch.float32 if h.dtype in HALF_DTYPES and h.device.type != "cpu" else h.dtype


def add_layer_norm_backward(dy, dh, h, weight, bias, mean, rstd, is_rms_norm):
    dtype = _norm_dtype(h, weight, bias)
    h_n, w, b = (None if t is None else t.to(dtype) for t in (h, weight, bias))
    dy, n = dy.to(dtype), [h.shape[-1]]
    if is_rms_norm:
        dx, dweight = _rms_norm_backward(dy, h_n, w, rstd)
        dbias = None
    else:
        stats = tuple(s.unsqueeze(-1).to(_layer_norm_stats_dtype(h_n)) for s in (mean, rstd))
        dx, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
            dy, h_n, n, *stats, w, b, [True, weight is not None, bias is not None]
        )
    if dh is not None:
        dx = dx + dh.to(dtype)
    return (
        dx.to(h.dtype),
        dweight.to(weight.dtype) if weight is not None else None,
        dbias.to(bias.dtype) if bias is not None else None,
    )


def _rms_norm_backward(dy, h, weight, rstd):
    """What autograd computes through ``F.rms_norm`` (torch has no fused CPU backward for it),
    in float32 for half precision as torch's own kernels accumulate."""
    dtype = torch.float32 if h.dtype in HALF_DTYPES else h.dtype
    dy, h, rstd = dy.to(dtype), h.to(dtype), rstd.unsqueeze(-1).to(dtype)
    xhat = h * rstd
    dxhat = dy * weight.to(dtype) if weight is not None else dy
    dx = (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True)) * rstd
    dweight = (dy * xhat).reshape(-1, h.shape[-1]).sum(0) if weight is not None else None
    return dx, dweight
