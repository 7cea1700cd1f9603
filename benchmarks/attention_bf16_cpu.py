"""CPU attention forward in bf16 (and fp32 for reference): fastgpt's native kernel against SDPA.

The target (issue 13): on a CPU with bf16 units (AMX, AVX512-BF16) the native bf16 forward at least
as fast as ``F.scaled_dot_product_attention`` at seq >= 1024. Both implementations are timed in one
process, interleaved round by round, so that load on a shared machine hits both alike; the ratio
``sdpa / native`` (median over rounds) is the figure, the milliseconds are only the machine's of
that minute.

- ``native``: ``torch.ops.fastgpt.native_attention_forward`` (the tiled forward, csrc/cpu/attention.cpp);
- ``sdpa``: ``F.scaled_dot_product_attention(q, k, v, is_causal=...)`` (torch's CPU flash kernel;
  on an AMD CPU its tile products run on MKL's bf16 product, which converts to fp32 there).

Prints a table and writes JSON (default ``benchmarks/results/cpu-<cpu>-<cores>core-<date>-attention-bf16.json``).

    python benchmarks/attention_bf16_cpu.py [--quick] [--threads N] [--rounds N] [--out PATH]
"""

import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from script_support import default_out, time_interleaved, write_result

import fastgpt.native  # noqa: F401  (loads the extension's ops)
from fastgpt import _C
from fastgpt.bench import cpu_model

# (batch, heads, seq, head_dim)
SHAPES = [(4, 8, 1024, 64), (1, 8, 2048, 64), (1, 8, 4096, 128)]
QUICK_SHAPES = [(4, 8, 1024, 64)]
DTYPES = [torch.bfloat16, torch.float32]
MIN_ROUND_S = 0.2  # each implementation runs about this long per round


def implementations(q, k, v, causal):
    scale = q.shape[-1] ** -0.5
    return {
        "native": lambda: torch.ops.fastgpt.native_attention_forward(q, k, v, causal, scale),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale),
    }


def load_average():
    try:
        return os.getloadavg()
    except OSError:
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, fewer rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of interleaved timing (default 7; 3 quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu-...-attention-bf16.json)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    out = args.out or default_out("attention-bf16")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    load_before = load_average()
    measurements = []
    print(f"threads {torch.get_num_threads()}, load average {load_before}")
    print(f"{'case':<30} {'native ms':>10} {'sdpa ms':>10} {'sdpa/native':>12}")
    for batch, heads, seq, head_dim in QUICK_SHAPES if args.quick else SHAPES:
        for dtype in DTYPES:
            for causal in (True, False):
                q, k, v = (torch.randn(batch, heads, seq, head_dim, dtype=dtype) for _ in range(3))
                samples = time_interleaved(implementations(q, k, v, causal), rounds, MIN_ROUND_S)
                seconds = {name: statistics.median(times) for name, times in samples.items()}
                ratios = [s / n for s, n in zip(samples["sdpa"], samples["native"])]
                record = {
                    "batch": batch, "heads": heads, "seq": seq, "head_dim": head_dim,
                    "dtype": str(dtype).removeprefix("torch."), "causal": causal,
                    "ms": {name: s * 1e3 for name, s in seconds.items()},
                    "ms_fastest_round": {name: min(times) * 1e3 for name, times in samples.items()},
                    "sdpa_over_native": statistics.median(ratios),
                    "sdpa_over_native_range": [min(ratios), max(ratios)],
                }
                measurements.append(record)
                case = f"{batch}x{heads}x{seq}x{head_dim} {record['dtype']} {'causal' if causal else 'full'}"
                print(f"{case:<30} {record['ms']['native']:10.2f} {record['ms']['sdpa']:10.2f} "
                      f"{record['sdpa_over_native']:11.2f}x  ({min(ratios):.2f}-{max(ratios):.2f})", flush=True)

    write_result(
        out,
        "fastgpt-attention-bf16-bench/1",
        machine={"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "build_info": _C.build_info(),
                 "load_average_before": load_before, "load_average_after": load_average()},
        settings={"rounds": rounds, "min_round_s": MIN_ROUND_S,
                  "statistic": "ms: median over rounds of the mean per call in a round; sdpa_over_native: "
                               "median over rounds of the per-round ratio (range: fastest and slowest round)"},
        measurements=measurements,
    )


if __name__ == "__main__":
    main()
