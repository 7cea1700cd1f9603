"""What every backend agrees on, owned by none of them: the dtype rules and limits of the contract
that ``docs/architecture.md`` describes, and the pieces of the attention variants any backend may
build on (which rows a window blinds; a packed batch run one sequence at a time). Backends import
from here, never from each other."""

import math

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float32,) + HALF_DTYPES  # what the fast backends take; float64 is the reference's


def dtype_unsupported(*named_tensors):
    """None when every ``(name, tensor)`` (tensor may be None) has a kernel dtype, else why not."""
    for name, t in named_tensors:
        if t is not None and t.dtype not in KERNEL_DTYPES:
            return f"{name} dtype {t.dtype} is not float32, float16 or bfloat16"
    return None


def residual_stream_dtype(x_dtype, residual_in_fp32):
    """The dtype of h = x + residual: float32 when asked for and x is half precision, else x's dtype."""
    return torch.float32 if residual_in_fp32 and x_dtype in HALF_DTYPES else x_dtype


# ----------------------------------------------------------------------------- attention variants


def blind_rows(seq_q, seq_k, causal, window):
    """How many leading query rows see no key under the bottom-right mask (``window`` as the
    backends receive it: ``(left, right)`` or None). Only leading rows can be blind: row ``i`` sees
    keys ``max(0, i + off - left) ..= min(seq_k - 1, i + off + right)``, ``off = seq_k - seq_q``,
    an interval that is empty only while ``i + off + right < 0``."""
    right = 0 if causal else -1 if window is None else window[1]
    return 0 if right < 0 else min(max(seq_q - seq_k - right, 0), seq_q)


def _sequence(t, start, end):
    """Rows ``start:end`` of a packed ``(total, heads, head_dim)`` tensor as a dense
    ``(1, heads, end - start, head_dim)`` view."""
    return t[start:end].transpose(0, 1).unsqueeze(0)


def _spans(cu_seqlens_q, cu_seqlens_k):
    """``[(q_start, q_end, k_start, k_end)]`` of the sequences with at least one query and one key."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1) if cq[b] < cq[b + 1] and ck[b] < ck[b + 1]]


def varlen_forward_by_sequence(attention_forward, q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, **variants):
    """A varlen forward made of a backend's dense ``attention_forward``, one sequence at a time:
    ``(o, lse)`` with o ``(total_q, heads, head_dim)`` and lse ``(heads, total_q)``. A sequence
    without keys keeps zeros and ``-inf``, as a row that sees no key does."""
    o = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    for qs, qe, ks, ke in _spans(cu_seqlens_q, cu_seqlens_k):
        o_b, lse_b = attention_forward(
            _sequence(q, qs, qe), _sequence(k, ks, ke), _sequence(v, ks, ke), causal, scale, **variants
        )
        o[qs:qe] = o_b[0].transpose(0, 1)
        lse[:, qs:qe] = lse_b[0]
    return o, lse


def varlen_backward_by_sequence(
    attention_backward, do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, causal, scale, **variants
):
    """The backward of ``varlen_forward_by_sequence``: a backend's dense ``attention_backward`` per
    sequence; keys no query sees get zero gradient."""
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for qs, qe, ks, ke in _spans(cu_seqlens_q, cu_seqlens_k):
        dq_b, dk_b, dv_b = attention_backward(
            _sequence(do, qs, qe), _sequence(q, qs, qe), _sequence(k, ks, ke), _sequence(v, ks, ke),
            _sequence(o, qs, qe), lse[:, qs:qe].unsqueeze(0).contiguous(), causal, scale, **variants,
        )
        dq[qs:qe] = dq_b[0].transpose(0, 1)
        dk[ks:ke] = dk_b[0].transpose(0, 1)
        dv[ks:ke] = dv_b[0].transpose(0, 1)
    return dq, dk, dv
