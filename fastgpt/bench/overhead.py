"""Call overhead: both ops on inputs so small that the call, not the kernel, is what costs (a small
model's layer at one token), against the torch ops they replace, with and without a backward.

The kernel does almost no work here, so the ratio to SDPA (attention) and to eager ``x + r`` then
``F.layer_norm`` (add+LayerNorm) is what fastgpt's Python wrapper, its backend choice and its
autograd wiring add per call.
"""

from fastgpt.bench.add_layer_norm import add_layer_norm_cases, add_layer_norm_impls
from fastgpt.bench.attention import attention_cases, attention_impls
from fastgpt.bench.running import run_cases

ATTENTION_SIZES = [(1, 2, 16, 16, True)]  # (batch, heads, seq, head_dim, causal)
ADD_LAYER_NORM_SIZES = [(1, 1024)]  # (rows, hidden): one token of a d1024 model


def run(settings, emit):
    """Time every implementation of both ops on the tiny inputs; ``emit(record)`` each result."""
    run_cases(attention_cases(settings, ATTENTION_SIZES), attention_impls(settings), settings, emit)
    run_cases(add_layer_norm_cases(settings, ADD_LAYER_NORM_SIZES), add_layer_norm_impls(settings), settings, emit)
