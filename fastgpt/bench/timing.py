"""How a call is timed: warm-up, repetitions that fit a time budget, and their summary.

CUDA events around each call on a GPU, ``time.perf_counter`` on the CPU; warm-up calls excluded;
median and 20th/80th percentiles over the repetitions. A ``step(i)`` runs the thing timed on input
set ``i``: cycling through several input sets keeps caches from flattering small sizes.
"""

import math
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int


def _percentile(sorted_values, q):
    """Linear-interpolated percentile of an already sorted list."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms):
    """The ``Timing`` of a list of call times in ms."""
    s = sorted(times_ms)
    return Timing(statistics.median(s), _percentile(s, 0.2), _percentile(s, 0.8), s[0], len(s))


def warm_up(step, n_sets, settings):
    """Run ``step(i)`` over every input set (so compilation, autotuning and first-touch costs stay
    out of the timing), then time one more call; returns the repetitions that fit the budget."""
    cuda = settings.device == "cuda"
    for i in range(max(settings.warmup, n_sets)):
        step(i % n_sets)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(0)
    if cuda:
        torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    return int(min(settings.max_reps, max(settings.min_reps, settings.budget_s / one)))


def timed_calls(step, first, count, n_sets, settings):
    """Times in ms of ``count`` calls ``step(i)``, i cycling over the input sets from ``first``:
    CUDA events around each call on a GPU, the host clock on the CPU."""
    indices = [(first + r) % n_sets for r in range(count)]
    if settings.device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in indices]
        for i, (start, end) in zip(indices, events):
            start.record()
            step(i)
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for i in indices:
        t0 = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


# Each implementation's timed repetitions are taken in this many blocks, in turn with the other
# implementations' blocks (A B C A B C ...): a slow spell of a shared machine then falls on every
# implementation alike, instead of on whichever happened to run during it.
TIMING_BLOCKS = 3


def block_reps(reps, block):
    """How many of ``reps`` repetitions block number ``block`` (of TIMING_BLOCKS) takes."""
    return reps // TIMING_BLOCKS + (1 if block < reps % TIMING_BLOCKS else 0)


def time_interleaved(steps, n_sets, settings):
    """``{name: Timing}`` of each of ``steps`` ({name: step(i)}), warmed up, then timed in
    TIMING_BLOCKS blocks taken in turn, each step going first in turn."""
    reps = {name: warm_up(step, n_sets, settings) for name, step in steps.items()}
    times = {name: [] for name in steps}
    names = list(steps)
    for block in range(TIMING_BLOCKS):
        for name in names[block % len(names):] + names[: block % len(names)]:
            times[name] += timed_calls(steps[name], len(times[name]), block_reps(reps[name], block), n_sets, settings)
    return {name: summarize(t) for name, t in times.items()}


def time_calls(step, n_sets, settings):
    """Time ``step(i)`` (i cycling over the input sets): warm-up excluded, median and p20/p80 in ms."""
    reps = warm_up(step, n_sets, settings)
    return summarize(timed_calls(step, 0, reps, n_sets, settings))


def input_set_count(set_bytes, settings):
    """How many input sets to cycle so that together they outgrow the last-level cache."""
    return int(min(64, max(2, math.ceil(settings.rotate_bytes / max(set_bytes, 1)))))


def page_faults(device):
    """Page faults this process has taken so far, on the CPU (None on a GPU, or where the OS does
    not count them). Each is the first touch of a freshly mapped 4 KiB page, which the kernel must
    zero: glibc maps every allocation of 32 MiB or more fresh and unmaps it on free, unless an
    earlier free left a large enough hole in its heap. So the same eager op on large tensors can
    run 3x faster or slower depending on what ran before it in the process; the JSON records the
    faults per call so that a reader can see which of the two was timed."""
    if device != "cpu":
        return None
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt
