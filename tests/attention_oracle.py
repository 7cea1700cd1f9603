"""The float64 attention oracle the attention suites share, and the checks of a backend's output,
log-sum-exp and gradients against it. A test module uses it with ``from attention_oracle import ...``."""

import math

import torch
from conftest import assert_close


def visible_keys(seq_q, seq_k, causal, window):
    """Query i sees key j when i + off - left <= j <= i + off + right, off = seq_k - seq_q; causal: right = 0."""
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0
    i = torch.arange(seq_q)[:, None] + (seq_k - seq_q)
    j = torch.arange(seq_k)[None, :]
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool)
    if right >= 0:
        visible &= j <= i + right
    if left >= 0:
        visible &= j >= i - left
    return visible


def attention_float64(q, k, v, causal, scale, window=None, softcap=0.0):
    """(o, lse) in float64 on (batch, heads, seq, head_dim) tensors; rows that see nothing give 0 / -inf."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    visible = visible_keys(q.shape[2], k.shape[2], causal, window)
    sees = visible.any(-1, keepdim=True)
    scores = torch.where(visible, scores, -math.inf)
    lse = torch.logsumexp(scores, -1)
    probs = torch.softmax(torch.where(sees, scores, 0.0), -1) * sees
    return torch.einsum("bhij,bhjd->bhid", probs, v), lse


def assert_forward_matches(o, lse, o64, lse64, q, dtype):
    """A backend's ``(o, lse)`` against the oracle's: dtypes and layout of the contract, values, and
    an lse of -inf exactly for the rows that see no key. Returns those rows' mask (True: sees one)."""
    assert o.dtype == dtype and o.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert_close("o", o, o64, dtype)
    seen = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse).cpu(), seen), "lse must be -inf exactly for rows that see no key"
    assert_close("lse", lse.cpu()[seen], lse64[seen], dtype)
    return seen


def assert_grads_match(grads, expected, inputs, dtype):
    """``(dq, dk, dv)`` against the oracle's gradients, in the dtypes and shapes of ``inputs``."""
    for name, grad, ref, like in zip(("dq", "dk", "dv"), grads, expected, inputs):
        assert grad.dtype == like.dtype and grad.shape == like.shape
        assert_close(name, grad, ref, dtype, factor=2.0)
