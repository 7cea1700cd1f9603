"""Residual add + LayerNorm on the CPU: fastgpt's backends against eager `x + r` then
F.layer_norm, and torch.compile of that."""

import pytest
from suite import ADD_LAYER_NORM_CASES as CASES
from suite import SETTINGS, case_id

from fastgpt import bench

IMPLS = bench.add_layer_norm_impls(SETTINGS)


@pytest.mark.parametrize("impl", IMPLS, ids=[i.name for i in IMPLS])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_add_layer_norm(time_case, case, impl):
    time_case(case, impl)
