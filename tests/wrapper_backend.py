"""A backend written the way a user would add one: a module that keeps the contract of
docs/architecture.md (here by delegating to the reference and counting calls) and one
``register_backend`` call (in conftest.py), after which the shared suites run on it too.
It implements the attention variants as well; a registration that declares them
(``variants=...``) lets them reach it, the one in conftest.py does not."""

import collections

from fastgpt import reference
from fastgpt.contract import dtype_unsupported

NAME = "wrapped"
calls = collections.Counter()


def attention_unsupported(q, k, v):
    return dtype_unsupported(("q", q))  # float64 stays the reference's, as for every fast backend


def attention_forward(q, k, v, causal, scale, **variants):
    calls["attention_forward"] += 1
    return reference.attention_forward(q, k, v, causal, scale, **variants)


def attention_backward(do, q, k, v, o, lse, causal, scale, **variants):
    calls["attention_backward"] += 1
    return reference.attention_backward(do, q, k, v, o, lse, causal, scale, **variants)


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, **variants):
    calls["varlen_attention_forward"] += 1
    return reference.varlen_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, **variants
    )


def varlen_attention_backward(
    do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, **variants
):
    calls["varlen_attention_backward"] += 1
    return reference.varlen_attention_backward(
        do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, **variants
    )


def add_layer_norm_unsupported(x, residual, weight, bias):
    return dtype_unsupported(("x", x))


def add_layer_norm_forward(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32):
    calls["add_layer_norm_forward"] += 1
    return reference.add_layer_norm_forward(x, residual, weight, bias, eps, is_rms_norm, residual_in_fp32)


def add_layer_norm_backward(dy, dh, h, weight, bias, mean, rstd, is_rms_norm):
    calls["add_layer_norm_backward"] += 1
    return reference.add_layer_norm_backward(dy, dh, h, weight, bias, mean, rstd, is_rms_norm)
