"""The ``attention_calls`` fixture shared by the integration tests: it records the q shape of every
``fastgpt.ops.attention`` call, so a test can tell fastgpt's attention ran from a silent fallback.
A test module uses it with ``from attention_spy import attention_calls``."""

import pytest

import fastgpt


@pytest.fixture
def attention_calls(monkeypatch):
    """The shapes of q for every fastgpt.ops.attention call during the test."""
    calls = []
    real = fastgpt.ops.attention

    def spy(q, k, v, **kwargs):
        calls.append(tuple(q.shape))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(fastgpt.ops, "attention", spy)
    return calls


@pytest.fixture
def varlen_attention_calls(monkeypatch):
    """``(q shape, cu_seqlens_q, cu_seqlens_k, causal)`` of every fastgpt.ops.varlen_attention call
    during the test (the offsets as lists)."""
    calls = []
    real = fastgpt.ops.varlen_attention

    def spy(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs):
        calls.append((tuple(q.shape), cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), kwargs.get("causal", True)))
        return real(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs)

    monkeypatch.setattr(fastgpt.ops, "varlen_attention", spy)
    return calls
