"""CPU sliding-window and packed-sequence attention: fastgpt's native kernels against torch.

Two kinds of case, each timed interleaved round by round (every implementation runs in turn in
each round, so load on a shared machine hits them alike), forward and forward+backward:

- window: causal attention with a sliding window (``window=(left, 0)``) at a few thousand tokens.
  ``native`` is ``fastgpt.ops.attention(..., window=..., backend="native")``, whose kernel skips the
  key tiles outside the window; ``sdpa_mask`` is ``F.scaled_dot_product_attention`` with an explicit
  boolean mask of the same window (what a user of torch writes); ``native_causal`` and
  ``sdpa_causal`` are full causal attention, the cost the window saves.
- varlen: a packed batch of sequences of mixed lengths, causal. ``native`` is
  ``fastgpt.ops.varlen_attention(..., backend="native")`` (one kernel call over every sequence);
  ``sdpa_loop`` calls ``F.scaled_dot_product_attention(is_causal=True)`` once per sequence.

Prints milliseconds and ratios and writes JSON (default
``benchmarks/results/cpu-<cpu>-<cores>core-<date>-window.json``).

    python benchmarks/window_cpu.py [--quick] [--rounds N] [--out PATH]
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import _C
from fastgpt.bench import cpu_model

# (batch, heads, seq, head_dim, window left, dtype)
WINDOW_CASES = [
    (1, 8, 4096, 64, 255, torch.float32),
    (1, 8, 4096, 64, 255, torch.bfloat16),
    (1, 8, 4096, 64, 1023, torch.float32),
]
# (sequence lengths, heads, head_dim, dtype)
VARLEN_CASES = [
    ((1000, 37, 2048, 512, 1), 8, 64, torch.float32),
]
QUICK_WINDOW_CASES = [(1, 8, 2048, 64, 255, torch.float32)]
MIN_ROUND_S = 0.2  # each implementation runs about this long per round


def window_implementations(batch, heads, seq, head_dim, left, dtype):
    """name -> (forward, forward+backward) for one window case."""
    q, k, v = (torch.randn(batch, heads, seq, head_dim, dtype=dtype) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    position = torch.arange(seq)
    offset = position[None, :] - position[:, None]  # key minus query
    mask = (offset <= 0) & (offset >= -left)  # query i sees keys i - left ..= i

    def native(causal_only=False):
        window = None if causal_only else (left, 0)
        return (
            lambda: fastgpt.ops.attention(q, k, v, window=window, backend="native"),
            lambda: fastgpt.ops.attention(qg, kg, vg, window=window, backend="native").backward(do),
        )

    def sdpa(is_causal, attn_mask):
        return (
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal),
            lambda: F.scaled_dot_product_attention(qg, kg, vg, attn_mask=attn_mask, is_causal=is_causal).backward(do),
        )

    return {
        "native": native(),
        "sdpa_mask": sdpa(False, mask),
        "native_causal": native(causal_only=True),
        "sdpa_causal": sdpa(True, None),
    }


def varlen_implementations(lengths, heads, head_dim, dtype):
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, dtype=dtype) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    starts = cu.tolist()

    def sdpa_loop(q, k, v):
        outs = []
        for start, end in zip(starts, starts[1:]):
            # (1, heads, length, head_dim) views: 3-D inputs would send SDPA to its math path (7x slower here)
            dense = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
            outs.append(F.scaled_dot_product_attention(*dense, is_causal=True)[0].transpose(0, 1))
        return torch.cat(outs)

    return {
        "native": (
            lambda: fastgpt.ops.varlen_attention(q, k, v, cu, cu, backend="native"),
            lambda: fastgpt.ops.varlen_attention(qg, kg, vg, cu, cu, backend="native").backward(do),
        ),
        "sdpa_loop": (lambda: sdpa_loop(q, k, v), lambda: sdpa_loop(qg, kg, vg).backward(do)),
    }


def time_interleaved(fns, rounds, min_round_s):
    """Seconds per call of each function in each round; a round runs every function in turn."""
    reps = {}
    for name, fn in fns.items():  # warm up, and size each round to about min_round_s
        fn()
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_round_s or calls == 0:
            fn()
            calls += 1
        reps[name] = max(1, round(calls * min_round_s / (time.perf_counter() - start)))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / reps[name])
    return samples


def measure(impls, rounds):
    """{"forward": {...}, "forward_backward": {...}}: median ms, fastest round ms per implementation."""
    result = {}
    for index, pass_name in enumerate(("forward", "forward_backward")):
        samples = time_interleaved({name: fns[index] for name, fns in impls.items()}, rounds, MIN_ROUND_S)
        result[pass_name] = {
            "ms": {name: statistics.median(times) * 1e3 for name, times in samples.items()},
            "ms_fastest_round": {name: min(times) * 1e3 for name, times in samples.items()},
        }
    return result


def ratios(timings, baselines):
    """baseline time / native time for each baseline, per pass."""
    return {
        pass_name: {f"{b}_over_native": t["ms"][b] / t["ms"]["native"] for b in baselines}
        for pass_name, t in timings.items()
    }


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def default_out():
    model = cpu_model().lower()
    brand = "epyc" if "epyc" in model else "xeon" if "xeon" in model else platform.machine()
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    name = f"cpu-{brand}-{os.cpu_count()}core-{date}-window.json"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small window case, no varlen, fewer rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of interleaved timing (default 7; 3 quick)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu-...-window.json)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    out = args.out or default_out()
    torch.manual_seed(0)

    measurements = []
    for batch, heads, seq, head_dim, left, dtype in QUICK_WINDOW_CASES if args.quick else WINDOW_CASES:
        timings = measure(window_implementations(batch, heads, seq, head_dim, left, dtype), rounds)
        record = {
            "kind": "window", "batch": batch, "heads": heads, "seq": seq, "head_dim": head_dim,
            "window": [left, 0], "causal": True, "dtype": str(dtype).removeprefix("torch."),
            **timings, "ratios": ratios(timings, ("sdpa_mask", "native_causal", "sdpa_causal")),
        }
        measurements.append(record)
        case = f"window {left + 1} {batch}x{heads}x{seq} d{head_dim} {record['dtype']}"
        for pass_name in ("forward", "forward_backward"):
            ms, r = record[pass_name]["ms"], record["ratios"][pass_name]
            print(f"{case:<34} {pass_name:<16} " + "  ".join(f"{n} {t:8.2f} ms" for n, t in ms.items())
                  + "  | " + "  ".join(f"{n} {x:5.2f}x" for n, x in r.items()), flush=True)

    for lengths, heads, head_dim, dtype in [] if args.quick else VARLEN_CASES:
        timings = measure(varlen_implementations(lengths, heads, head_dim, dtype), rounds)
        record = {
            "kind": "varlen", "lengths": list(lengths), "heads": heads, "head_dim": head_dim, "causal": True,
            "dtype": str(dtype).removeprefix("torch."), **timings, "ratios": ratios(timings, ("sdpa_loop",)),
        }
        measurements.append(record)
        case = f"varlen {list(lengths)} h{heads} d{head_dim} {record['dtype']}"
        for pass_name in ("forward", "forward_backward"):
            ms, r = record[pass_name]["ms"], record["ratios"][pass_name]
            print(f"{case:<34} {pass_name:<16} " + "  ".join(f"{n} {t:8.2f} ms" for n, t in ms.items())
                  + "  | " + "  ".join(f"{n} {x:5.2f}x" for n, x in r.items()), flush=True)

    result = {
        "schema": "fastgpt-window-bench/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "commit": git_commit(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "load_average": os.getloadavg(), "torch": torch.__version__, "build_info": _C.build_info()},
        "settings": {
            "rounds": rounds, "min_round_s": MIN_ROUND_S,
            "statistic": "ms: median over rounds of the mean per call in a round; ms_fastest_round: the fastest round",
            "timed": "public ops (fastgpt.ops.attention / varlen_attention with backend='native', "
                     "F.scaled_dot_product_attention); forward_backward includes the backward through autograd",
        },
        "measurements": measurements,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
