"""What the standalone benchmark scripts (decode_cpu.py, window_attention.py, attention_bf16_cpu.py)
share: timing callables in interleaved rounds, and naming and writing their JSON results.

The timing differs from ``fastgpt.bench.timing`` on purpose: a round here is the mean of many
calls of one function, and the scripts report the median and fastest round, not per-call
percentiles.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

from fastgpt.bench import cpu_model

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_interleaved(functions, rounds, min_round_s, before=None, synchronize=None):
    """``{name: [seconds per call, one entry a round]}`` of each of ``functions`` ({name: fn()}).

    Each function is warmed up and its round sized to about ``min_round_s`` of calls; then every
    round runs each function in turn, so that load on a shared machine hits them all alike.
    ``before(name)``, if given, runs untimed before a function's warm-up and each of its rounds
    (decode_cpu.py sets the kernel route there); ``synchronize``, if given (torch.cuda.synchronize),
    waits for the device before the clock is read."""
    before = before or (lambda name: None)
    synchronize = synchronize or (lambda: None)
    reps = {}
    for name, fn in functions.items():
        before(name)
        fn()
        synchronize()
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_round_s or calls == 0:
            fn()
            synchronize()
            calls += 1
        reps[name] = max(1, round(calls * min_round_s / (time.perf_counter() - start)))
    samples = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            before(name)
            synchronize()
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            synchronize()
            samples[name].append((time.perf_counter() - start) / reps[name])
    return samples


def git_commit():
    """The checked-out commit, or None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_name(device="cpu"):
    """The results-file prefix: cpu-<brand>-<cores>core, or gpu-<model>."""
    if device == "cuda":
        return "gpu-" + torch.cuda.get_device_name().lower().replace("nvidia", "").strip().replace(" ", "-")
    model = cpu_model().lower()
    brand = "epyc" if "epyc" in model else "xeon" if "xeon" in model else platform.machine()
    return f"cpu-{brand}-{os.cpu_count()}core"


def default_out(kind, device="cpu"):
    """benchmarks/results/<machine>-<UTC date>-<kind>.json"""
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return os.path.join(RESULTS_DIR, f"{machine_name(device)}-{date}-{kind}.json")


def write_result(out, schema, machine, settings, measurements):
    """Writes a run's JSON to ``out`` (creating its folder), stamped with the time, the command
    line and the commit, and says where."""
    result = {
        "schema": schema,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "commit": git_commit(),
        "machine": machine,
        "settings": settings,
        "measurements": measurements,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
