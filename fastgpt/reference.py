"""The ``reference`` backend: every op written as the textbook formula in plain PyTorch.

It is the fallback that runs anywhere and the readable statement of what the fast backends
compute. Half-precision inputs are computed in float32 and the results cast back, so the
reference is as accurate as the fast paths are asked to be. Functions keep the backend
contract of ``docs/architecture.md``: same names and signatures in every backend. Every
attention variant (sliding window, soft-capping, packed sequences) is here, as the same formula
with an explicit mask; a packed batch runs one sequence at a time.
"""

import math

import torch

from fastgpt.contract import residual_stream_dtype, varlen_backward_by_sequence, varlen_forward_by_sequence


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv(t, heads):
    """Repeat each key/value head for the query heads that share it (GQA/MQA)."""
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def _visible_keys(seq_q, seq_k, causal, window, device):
    """Which keys each query sees, or None when it sees all: with ``off = seq_k - seq_q`` (aligned
    bottom-right), query i sees key j when ``i + off - left <= j <= i + off + right`` (-1: that side
    unbounded); causal means ``right = 0``."""
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if right >= 0:
        visible = visible.tril(seq_k - seq_q + right)
    if left >= 0:
        visible = visible.triu(seq_k - seq_q - left)
    return visible


def _probabilities(q, k, causal, scale, window, softcap):
    """softmax of the scores ``q kᵀ · scale`` (soft-capped: ``softcap · tanh(score / softcap)``) with
    the mask, their log-sum-exp, and the tanh of the capped scores (None without a cap); rows that
    see no key give 0 / -inf."""
    scores = q @ k.transpose(-2, -1) * scale
    tanh = None
    if softcap:
        tanh = torch.tanh(scores / softcap)
        scores = softcap * tanh
    visible = _visible_keys(q.shape[-2], k.shape[-2], causal, window, q.device)
    if visible is not None:
        scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if visible is not None:
        # a row with every key masked has no probabilities (softmax gives 0/0 there); only those rows
        # are zeroed, so a NaN or inf in the inputs propagates as in the formula (and in SDPA)
        probs = probs.masked_fill(~visible.any(-1, keepdim=True), 0.0)
    return probs, lse, tanh


def attention_unsupported(q, k, v):
    return None  # the reference runs every valid input


def attention_forward(q, k, v, causal, scale, *, window=None, softcap=0.0):
    heads = q.shape[1]
    ct = _compute_dtype(q.dtype)
    q32, k32, v32 = q.to(ct), _expand_kv(k, heads).to(ct), _expand_kv(v, heads).to(ct)
    probs, lse, _ = _probabilities(q32, k32, causal, scale, window, softcap)
    o = probs @ v32
    visible = _visible_keys(q.shape[-2], k.shape[-2], causal, window, q.device)
    if visible is not None:  # a row that sees no key is zeros whatever v holds (its 0 · NaN would be NaN)
        o = o.masked_fill(~visible.any(-1, keepdim=True), 0.0)
    return o.to(q.dtype), lse.to(torch.float32)


def attention_backward(do, q, k, v, o, lse, causal, scale, *, window=None, softcap=0.0):
    heads, kv_heads = q.shape[1], k.shape[1]
    ct = _compute_dtype(q.dtype)
    q32, k32, v32 = q.to(ct), _expand_kv(k, heads).to(ct), _expand_kv(v, heads).to(ct)
    do32, o32 = do.to(ct), o.to(ct)
    probs, _, tanh = _probabilities(q32, k32, causal, scale, window, softcap)
    dv = probs.transpose(-2, -1) @ do32
    dprobs = do32 @ v32.transpose(-2, -1)
    delta = (do32 * o32).sum(-1, keepdim=True)  # rowsum(dO ∘ O) == rowsum(P ∘ dP)
    dscores = probs * (dprobs - delta)
    if tanh is not None:  # d/ds of softcap · tanh(s / softcap)
        dscores = dscores * (1 - tanh * tanh)
    dq = dscores @ k32 * scale
    dk = dscores.transpose(-2, -1) @ q32 * scale
    if kv_heads != heads:  # sum the gradients of the query heads that share a key/value head
        b, _, s, d = dk.shape
        dk = dk.view(b, kv_heads, heads // kv_heads, s, d).sum(2)
        dv = dv.view(b, kv_heads, heads // kv_heads, s, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def varlen_attention_forward(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, *, window=None, softcap=0.0
):
    return varlen_forward_by_sequence(
        attention_forward, q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window=window, softcap=softcap
    )


def varlen_attention_backward(
    do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, *, window=None, softcap=0.0
):
    return varlen_backward_by_sequence(
        attention_backward, do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, causal, scale, window=window, softcap=softcap
    )


def add_layer_norm_unsupported(x, residual, weight, bias):
    return None


def add_layer_norm_forward(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32):
    ct = _compute_dtype(x.dtype)
    h_dtype = residual_stream_dtype(x.dtype, residual_in_fp32)
    # normalize h as stored (rounded to its dtype), so the backward's recomputation from the stored
    # h agrees with the forward: otherwise a constant row gives (h - mean) = rounding noise × rstd
    h32 = (x.to(ct) + residual.to(ct)).to(h_dtype).to(ct)
    if is_rms_norm:
        mean = torch.zeros(h32.shape[:-1], dtype=ct, device=x.device)
        var = (h32 * h32).mean(-1)
    else:
        mean = h32.mean(-1)
        var = ((h32 - mean.unsqueeze(-1)) ** 2).mean(-1)
    rstd = torch.rsqrt(var + eps)
    y = (h32 - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    # contiguous outputs whatever x's layout, as the op's fake kernel (and every backend) gives them
    return (y.to(x.dtype).contiguous(), h32.to(h_dtype).contiguous(), mean.to(torch.float32).contiguous(),
            rstd.to(torch.float32).contiguous())


def add_layer_norm_backward(dy, dh, h, weight, bias, mean, rstd, is_rms_norm):
    ct = _compute_dtype(h.dtype)
    n = h.shape[-1]
    xhat = (h.to(ct) - mean.to(ct).unsqueeze(-1)) * rstd.to(ct).unsqueeze(-1)
    dy32 = dy.to(ct)
    dxhat = dy32 * weight.to(ct) if weight is not None else dy32
    # d/dh of (h - mean)·rstd: subtract the mean of dxhat (LayerNorm only) and its projection on xhat
    proj = (dxhat * xhat).sum(-1, keepdim=True) / n
    if is_rms_norm:
        dx = (dxhat - xhat * proj) * rstd.to(ct).unsqueeze(-1)
    else:
        dx = (dxhat - dxhat.mean(-1, keepdim=True) - xhat * proj) * rstd.to(ct).unsqueeze(-1)
    if dh is not None:
        dx = dx + dh.to(ct)
    rows = dy32.reshape(-1, n)
    dweight = (rows * xhat.reshape(-1, n)).sum(0).to(weight.dtype) if weight is not None else None
    dbias = rows.sum(0).to(bias.dtype) if bias is not None else None
    return dx.to(h.dtype), dweight, dbias
