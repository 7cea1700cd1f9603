"""Installed from an sdist or a wheel with build isolation, fastgpt's native backend really runs.

FASTGPT_EXPECT_ORIGIN (set by CI) names how fastgpt._C must have been built: "first-use" for an
install whose build could not see torch.
"""

import os

import torch
from downstream_attention import causal_attention

import fastgpt
from fastgpt import native


def test_native_backend_is_available():
    report = fastgpt.backends()["native"]
    assert report["available"], report["reason"]
    expected = os.environ.get("FASTGPT_EXPECT_ORIGIN")
    if expected:
        assert native.LOADED.origin == expected, native.LOADED


def test_attention_runs_the_native_kernel_and_matches_the_reference():
    q, k, v = (torch.randn(2, 4, 33, 16) for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = causal_attention(q, k, v, backend="native")
    ran = {event.name for event in profile.events()}
    assert "fastgpt::native_attention_forward" in ran, sorted(ran)
    expected = causal_attention(q.double(), k.double(), v.double(), backend="reference")
    assert (out.double() - expected).norm() / expected.norm() < 1e-5
