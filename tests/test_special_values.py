"""The reference backend is the oracle: NaN and inf reach the output exactly where the textbook
formula puts them, and only a row that sees no key is defined as zeros."""

import math

import pytest
import torch

from fastgpt import ops


def _textbook_attention(q, k, v):
    """softmax(QKᵀ/√d with the bottom-right causal mask) V in float64, no special cases."""
    q, k, v = q.double(), k.double(), v.double()
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool).tril(seq_k - seq_q)
    scores = scores.masked_fill(~visible, -math.inf)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    return (weights / weights.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize(
    "tensor, index, value",
    [("q", (0, 0, 2, 3), math.nan), ("k", (0, 1, 1, 0), math.nan), ("k", (0, 0, 1, 2), math.inf), ("v", (0, 0, 0, 1), -math.inf)],
)
def test_reference_propagates_nan_and_inf_like_the_formula(tensor, index, value):
    torch.manual_seed(0)
    inputs = {name: torch.randn(1, 2, 5, 8) for name in "qkv"}
    inputs[tensor][index] = value
    expected = _textbook_attention(inputs["q"], inputs["k"], inputs["v"]).float()
    got = ops.attention(inputs["q"], inputs["k"], inputs["v"], backend="reference")
    assert torch.equal(got.isfinite(), expected.isfinite()) and not got.isfinite().all()
    torch.testing.assert_close(got, expected, equal_nan=True)


def test_reference_overflow_in_float32_is_not_hidden():
    q = torch.full((1, 1, 2, 4), 1e30)
    o = ops.attention(q, q, torch.randn(1, 1, 2, 4), backend="reference")
    assert not o.isfinite().all()


def test_a_row_that_sees_no_key_is_zeros():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    o = ops.attention(q, k, v, backend="reference")
    assert torch.equal(o[0, 0, :3], torch.zeros(3, 8))
    assert o[0, 0, 3:].isfinite().all()
