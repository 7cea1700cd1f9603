"""Running a kernel op's cases: every implementation on every case, their timed repetitions
interleaved, each result (or the reason there is none) emitted as a record."""

import warnings

import torch

from fastgpt import ops
from fastgpt.bench.records import first_line, record
from fastgpt.bench.timing import (
    TIMING_BLOCKS,
    block_reps,
    input_set_count,
    page_faults,
    summarize,
    timed_calls,
    warm_up,
)

# Implementations that materialize the (b, h, sq, sk) score matrix are skipped above this many
# bytes of fp32 scores: past it they would only measure the allocator (or run out of memory).
SCORE_BYTES_LIMIT = {"cuda": 16 << 30, "cpu": 2 << 30}
MATERIALIZING_IMPLS = ("torch eager", "torch.compile", "fastgpt/reference", "sdpa/math")


def skip_reason(impl, case, settings):
    """Why ``impl`` is not timed on ``case`` (None: it is)."""
    if impl.skip_reason:
        return impl.skip_reason
    limit = SCORE_BYTES_LIMIT[settings.device]
    if impl.name in MATERIALIZING_IMPLS and case.materialized_bytes > limit:
        return f"builds a {case.materialized_bytes / 2**30:.0f} GiB score matrix (limit {limit / 2**30:.0f} GiB)"
    return None


def make_input_sets(case, settings):
    """Enough input sets of ``case`` to outgrow the last-level cache when cycled; for a backward
    pass every input but the output gradient requires grad."""
    first = case.make_inputs()
    n_sets = input_set_count(sum(t.numel() * t.element_size() for t in first), settings)
    input_sets = [first] + [case.make_inputs() for _ in range(n_sets - 1)]
    if case.pass_ == "fwd+bwd":
        for inputs in input_sets:
            for t in inputs[:-1]:
                t.requires_grad_(True)
    return input_sets


def step_for(impl, case, input_sets):
    """A ``step(i)`` that runs ``impl`` on input set ``i``: forward only, or forward then backward."""
    extra = case.extra_args
    if case.pass_ == "fwd":

        def step(i):
            with torch.no_grad():
                impl.run(*input_sets[i][:-1], *extra)

        return step

    def step(i):
        *inputs, grad = input_sets[i]
        out = impl.run(*inputs, *extra)
        torch.autograd.grad(out, inputs, grad)

    return step


def _failure(exc, impl, caught, settings):
    """(status, reason) of an implementation that raised: a baseline or a backend declining the
    inputs is skipped; any other fastgpt failure is an error. SDPA says why a backend refuses the
    inputs in warnings, then raises a vaguer error: the warnings join the reason."""
    status = "skipped" if impl.kind == "baseline" or isinstance(exc, ops.BackendError) else "error"
    why = [first_line(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if settings.device == "cuda":
        torch.cuda.empty_cache()
    return status, f"{type(exc).__name__}: {first_line(exc)}" + "".join(f" [{w}]" for w in why[:2])


def run_cases(cases, impls, settings, emit):
    """Time every implementation on every case, their repetitions interleaved in TIMING_BLOCKS
    blocks; ``emit(record)`` receives each result, in the order of ``impls``."""
    for case in cases:
        input_sets = make_input_sets(case, settings)
        n_sets = len(input_sets)
        records, timed = {}, {}  # impl index -> record; impl index -> (step, reps, times, page faults)
        for index, impl in enumerate(impls):
            reason = skip_reason(impl, case, settings)
            if reason is not None:
                records[index] = record(case, impl, settings, "skipped", reason)
                continue
            step = step_for(impl, case, input_sets)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    timed[index] = (step, warm_up(step, n_sets, settings), [], [])
                except Exception as exc:  # an unavailable kernel or an out-of-memory must not end the run
                    records[index] = record(case, impl, settings, *_failure(exc, impl, caught, settings))
        for block in range(TIMING_BLOCKS):
            for index, (step, reps, times, faults) in list(timed.items()):
                count = block_reps(reps, block)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        faults_before = page_faults(settings.device)
                        times += timed_calls(step, len(times), count, n_sets, settings)
                        if faults_before is not None:
                            faults.append(page_faults(settings.device) - faults_before)
                    except Exception as exc:  # noqa: BLE001 - recorded, and the others go on
                        failure = _failure(exc, impls[index], caught, settings)
                        records[index] = record(case, impls[index], settings, *failure)
                        del timed[index]
        for index, (_, _, times, faults) in timed.items():
            records[index] = record(
                case, impls[index], settings, "ok", timing=summarize(times), n_sets=n_sets,
                page_faults=sum(faults) if faults else None,
            )
        for index in sorted(records):
            emit(records[index])
        del input_sets, timed
