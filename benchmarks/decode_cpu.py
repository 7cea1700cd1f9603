"""CPU decode attention: fastgpt's native kernel against SDPA and the copy bandwidth of the same bytes.

Decoding (1-4 queries per sequence against a KV cache) is memory-bound, so each case is measured
against three things in the same run, interleaved round by round so that load on a shared machine
hits every implementation alike:

- ``native``: ``torch.ops.fastgpt.native_attention_forward``, which routes few queries to the decode
  kernel by its rule (csrc/cpu/attention_decode.cpp);
- ``tiles`` / ``decode``: the same op with the route forced to the tiled forward / the decode kernel
  (the measurements the routing rule is derived from);
- ``sdpa``: ``F.scaled_dot_product_attention(..., enable_gqa=True)`` with the same bottom-right
  causal mask (for one query per sequence that is no mask at all; for more, an explicit boolean mask);
- ``copy``: ``Tensor.copy_`` of the K and V bytes into preallocated buffers, the bandwidth ceiling.

Prints a table of milliseconds, ratios and GB/s of K/V read, and writes JSON (default
``benchmarks/results/cpu-<cpu>-<cores>core-<date>-decode.json``).

    python benchmarks/decode_cpu.py [--quick] [--out PATH]
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

# (batch, heads, kv_heads, queries, keys, head_dim, dtype)
CASES = [
    (1, 32, 8, 1, 4096, 128, torch.float32),
    (1, 32, 8, 1, 8192, 128, torch.float32),
    (1, 32, 8, 1, 16384, 128, torch.float32),
    (1, 32, 8, 1, 32768, 128, torch.float32),
    (1, 32, 8, 4, 4096, 128, torch.float32),
    (4, 32, 8, 1, 4096, 128, torch.float32),
    (1, 12, 12, 1, 1024, 64, torch.float32),
    (1, 12, 12, 4, 1024, 64, torch.float32),
    (1, 12, 12, 1, 128, 64, torch.float32),
    (1, 32, 8, 1, 4096, 128, torch.bfloat16),
    (1, 32, 8, 1, 16384, 128, torch.bfloat16),
    (1, 12, 12, 1, 1024, 64, torch.bfloat16),
    (1, 12, 12, 4, 1024, 64, torch.bfloat16),
]
MIN_ROUND_S = 0.05  # each implementation runs this long per round
QUICK_CASES = [CASES[0], CASES[6], CASES[9], CASES[11]]


def make_inputs(batch, heads, kv_heads, queries, keys, head_dim, dtype):
    """q and K/V as views of a preallocated cache longer than the keys used, as a KV cache holds them."""
    q = torch.randn(batch, heads, queries, head_dim, dtype=dtype)
    cache = torch.randn(2, batch, kv_heads, keys + keys // 8, head_dim, dtype=dtype)
    return q, cache[0, :, :, :keys], cache[1, :, :, :keys]


def implementations(q, k, v):
    scale = q.shape[-1] ** -0.5
    queries, keys = q.shape[2], k.shape[2]
    # bottom-right causal alignment: query i sees keys j <= i + keys - queries
    mask = None
    if queries > 1:
        mask = torch.arange(keys)[None, :] <= torch.arange(queries)[:, None] + (keys - queries)
    k_copy, v_copy = torch.empty(k.shape, dtype=k.dtype), torch.empty(v.shape, dtype=v.dtype)

    def native():
        return torch.ops.fastgpt.native_attention_forward(q, k, v, True, scale)

    def copy():
        k_copy.copy_(k)
        v_copy.copy_(v)

    # name: (route of the native op's few-query inputs, set before each round; function)
    return {
        "native": ("rule", native),
        "decode": ("always", native),
        "tiles": ("never", native),
        "sdpa": ("rule", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)),
        "copy": ("rule", copy),
    }


def set_route(route):
    """The test hook of csrc/cpu/attention_decode.cpp: 'rule', or force 'always'/'never' the decode kernel."""
    torch.ops.fastgpt._set_cpu_decode(route, 0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="four cases, fewer rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of interleaved timing (default 15; 5 quick)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu-...-decode.json)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 15)
    out = args.out or default_out("decode")

    torch.manual_seed(0)
    measurements = []
    header = (f"{'case':<36} {'native':>8} {'decode':>8} {'tiles':>8} {'sdpa':>8} {'copy':>8}  "
              f"{'sdpa/nat':>8} {'tile/dec':>8} {'GB/s':>6} {'copy GB/s':>9} {'of copy':>7}")
    print(header)
    try:
        for batch, heads, kv_heads, queries, keys, head_dim, dtype in (QUICK_CASES if args.quick else CASES):
            q, k, v = make_inputs(batch, heads, kv_heads, queries, keys, head_dim, dtype)
            impls = implementations(q, k, v)
            samples = time_interleaved({name: fn for name, (_, fn) in impls.items()}, rounds, MIN_ROUND_S,
                                       before=lambda name: set_route(impls[name][0]))
            # the median is the figure; the fastest round shows what the code does when the machine is quiet
            seconds = {name: statistics.median(times) for name, times in samples.items()}
            kv_bytes = 2 * k.numel() * k.element_size()
            record = {
                "batch": batch, "heads": heads, "kv_heads": kv_heads, "queries": queries, "keys": keys,
                "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."), "kv_bytes": kv_bytes,
                "ms": {name: s * 1e3 for name, s in seconds.items()},
                "ms_fastest_round": {name: min(times) * 1e3 for name, times in samples.items()},
                "sdpa_over_native": seconds["sdpa"] / seconds["native"],
                "tiles_over_decode": seconds["tiles"] / seconds["decode"],
                "native_kv_gb_per_s": kv_bytes / seconds["native"] / 1e9,
                "copy_kv_gb_per_s": kv_bytes / seconds["copy"] / 1e9,
                "native_fraction_of_copy": seconds["copy"] / seconds["native"],
            }
            measurements.append(record)
            ms = record["ms"]
            case = f"{batch}x{heads}/{kv_heads}x{queries}q x{keys}k d{head_dim} {record['dtype']}"
            print(f"{case:<36} {ms['native']:8.3f} {ms['decode']:8.3f} {ms['tiles']:8.3f} {ms['sdpa']:8.3f} "
                  f"{ms['copy']:8.3f}  {record['sdpa_over_native']:7.2f}x {record['tiles_over_decode']:7.2f}x "
                  f"{record['native_kv_gb_per_s']:6.1f} {record['copy_kv_gb_per_s']:9.1f} "
                  f"{record['native_fraction_of_copy']:6.0%}", flush=True)
    finally:
        set_route("rule")

    write_result(
        out,
        "fastgpt-decode-bench/1",
        machine={"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "build_info": _C.build_info()},
        settings={"rounds": rounds, "min_round_s": MIN_ROUND_S,
                  "statistic": "ms: median over rounds of the mean per call in a round; ms_fastest_round: the fastest round",
                  "timed": "ms: native (routed by rule), decode (forced), tiles (forced), sdpa, copy of K+V"},
        measurements=measurements,
    )


if __name__ == "__main__":
    main()
