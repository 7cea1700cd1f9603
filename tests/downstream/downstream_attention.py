"""What a downstream model does with fastgpt: causal self-attention through its public op."""

import fastgpt


def causal_attention(q, k, v, backend="auto"):
    return fastgpt.ops.attention(q, k, v, causal=True, backend=backend)
