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
