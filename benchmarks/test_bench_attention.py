"""Causal attention on the CPU: fastgpt's backends against eager PyTorch, torch.compile and SDPA."""

import pytest
from suite import ATTENTION_CASES as CASES
from suite import SETTINGS, case_id

from fastgpt import bench

IMPLS = bench.attention_impls(SETTINGS)


@pytest.mark.parametrize("impl", IMPLS, ids=[i.name for i in IMPLS])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_attention(time_case, case, impl):
    time_case(case, impl)
