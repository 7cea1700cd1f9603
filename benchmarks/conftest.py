"""pytest-benchmark suites for fastgpt's CPU paths (not run by CI: the default `python -m pytest`
collects tests/ only). Run from the repository root:

    python -m pytest benchmarks -q --benchmark-json=benchmarks/results/cpu-$(date +%F).json

Each test is one (op, size, pass, implementation) point, grouped per op and size so that
pytest-benchmark prints fastgpt's backends next to eager PyTorch, torch.compile and SDPA.
Sizes are the issue's CPU reference points: attention (4, 8, 1024, 64) causal fp32 and
add+LayerNorm (8192, 1024) fp32.
"""

import itertools

import pytest
import torch
from suite import SETTINGS, case_id

from fastgpt import bench


@pytest.fixture
def time_case(benchmark):
    """time_case(case, impl): warm up (compiling, if any, stays out), then let pytest-benchmark
    time one call per round, cycling through input sets that outgrow the last-level cache."""

    def run(case, impl):
        reason = bench.skip_reason(impl, case, SETTINGS)
        if reason:
            pytest.skip(reason)
        input_sets = bench.make_input_sets(case, SETTINGS)
        n_sets = len(input_sets)
        step = bench.step_for(impl, case, input_sets)
        try:
            for i in range(max(SETTINGS.warmup, n_sets)):
                step(i % n_sets)
        except Exception as exc:  # an SDPA backend that refuses the CPU, a backend that is missing
            pytest.skip(f"{impl.name} cannot run this case: {type(exc).__name__}: {bench.first_line(exc)}")
        benchmark.group = f"{case.op} {case_id(case)}"
        benchmark.extra_info.update(
            implementation=impl.name, flops=case.flops, bytes=case.bytes, shape=case.shape, input_sets=n_sets
        )
        counter = itertools.count()
        benchmark(lambda: step(next(counter) % n_sets))

    torch.manual_seed(0)
    return run
