"""Sliding-window and packed-sequence attention: fastgpt's kernels against torch, on the CPU (the
native backend) or a GPU (the Triton backend).

Two kinds of case, each timed interleaved round by round (every implementation runs in turn in
each round, so load on a shared machine hits them alike), forward and forward+backward:

- window: causal attention with a sliding window (``window=(left, 0)``): a few thousand tokens on
  the CPU, 16k on a GPU. ``fastgpt`` is ``fastgpt.ops.attention(..., window=...)`` on the device's
  kernel backend, which skips the key tiles outside the window; ``sdpa_mask`` is
  ``F.scaled_dot_product_attention`` with an explicit boolean mask of the same window (what a user
  of torch writes); ``fastgpt_causal`` and ``sdpa_causal`` are full causal attention, the cost the
  window saves; on a GPU with flash_attn installed, ``flash_attn`` is its ``window_size`` option.
- varlen: a packed batch of sequences of mixed lengths, causal. ``fastgpt`` is
  ``fastgpt.ops.varlen_attention`` (one kernel call over every sequence); ``sdpa_loop`` calls
  ``F.scaled_dot_product_attention(is_causal=True)`` once per sequence.

Prints milliseconds and ratios and writes JSON (default
``benchmarks/results/<cpu-...|gpu-...>-<date>-window.json``).

    python benchmarks/window_attention.py [--device cpu|cuda] [--quick] [--rounds N] [--out PATH]
"""

import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from script_support import default_out, time_interleaved, write_result

import fastgpt
from fastgpt import _C
from fastgpt.bench import cpu_model

# per device: (batch, heads, seq, head_dim, window left, dtype)
WINDOW_CASES = {
    "cpu": [
        (1, 8, 4096, 64, 255, torch.float32),
        (1, 8, 4096, 64, 255, torch.bfloat16),
        (1, 8, 4096, 64, 1023, torch.float32),
    ],
    "cuda": [
        (1, 16, 16384, 128, 511, torch.bfloat16),
        (1, 16, 16384, 128, 4095, torch.bfloat16),
    ],
}
QUICK_WINDOW_CASES = {"cpu": [(1, 8, 2048, 64, 255, torch.float32)], "cuda": [(1, 16, 16384, 128, 511, torch.bfloat16)]}
# per device: (sequence lengths, heads, head_dim, dtype)
VARLEN_CASES = {
    "cpu": [((1000, 37, 2048, 512, 1), 8, 64, torch.float32)],
    "cuda": [((8000, 37, 2048, 4096, 1, 2200), 16, 128, torch.bfloat16)],
}
KERNEL_BACKEND = {"cpu": "native", "cuda": "triton"}  # whose kernels are timed on each device
MIN_ROUND_S = 0.2  # each implementation runs about this long per round


def window_implementations(batch, heads, seq, head_dim, left, dtype, device):
    """name -> (forward, forward+backward) for one window case."""
    backend = KERNEL_BACKEND[device]
    q, k, v = (torch.randn(batch, heads, seq, head_dim, dtype=dtype, device=device) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    position = torch.arange(seq, device=device)
    offset = position[None, :] - position[:, None]  # key minus query
    mask = (offset <= 0) & (offset >= -left)  # query i sees keys i - left ..= i

    def fastgpt_attention(causal_only=False):
        window = None if causal_only else (left, 0)
        return (
            lambda: fastgpt.ops.attention(q, k, v, window=window, backend=backend),
            lambda: fastgpt.ops.attention(qg, kg, vg, window=window, backend=backend).backward(do),
        )

    def sdpa(is_causal, attn_mask):
        return (
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal),
            lambda: F.scaled_dot_product_attention(qg, kg, vg, attn_mask=attn_mask, is_causal=is_causal).backward(do),
        )

    impls = {
        "fastgpt": fastgpt_attention(),
        "sdpa_mask": sdpa(False, mask),
        "fastgpt_causal": fastgpt_attention(causal_only=True),
        "sdpa_causal": sdpa(True, None),
    }
    flash = _flash_attn_window(q, k, v, qg, kg, vg, do, left) if device == "cuda" else None
    if flash is not None:
        impls["flash_attn"] = flash
    return impls


def _flash_attn_window(q, k, v, qg, kg, vg, do, left):
    """flash_attn's own sliding window on (b, s, h, d) views, when it is installed."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None

    def run(q, k, v):
        o = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, window_size=(left, 0))
        return o.transpose(1, 2)

    return (lambda: run(q, k, v), lambda: run(qg, kg, vg).backward(do))


def varlen_implementations(lengths, heads, head_dim, dtype, device):
    backend = KERNEL_BACKEND[device]
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, dtype=dtype, device=device) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    starts = cu.tolist()
    longest = max(lengths)

    def sdpa_loop(q, k, v):
        outs = []
        for start, end in zip(starts, starts[1:]):
            # (1, heads, length, head_dim) views: 3-D inputs would send SDPA to its math path (7x slower on the CPU)
            dense = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
            outs.append(F.scaled_dot_product_attention(*dense, is_causal=True)[0].transpose(0, 1))
        return torch.cat(outs)

    def varlen(q, k, v):
        return fastgpt.ops.varlen_attention(q, k, v, cu, cu, max_seqlen_q=longest, max_seqlen_k=longest, backend=backend)

    return {
        "fastgpt": (lambda: varlen(q, k, v), lambda: varlen(qg, kg, vg).backward(do)),
        "sdpa_loop": (lambda: sdpa_loop(q, k, v), lambda: sdpa_loop(qg, kg, vg).backward(do)),
    }


def measure(impls, rounds, device):
    """{"forward": {...}, "forward_backward": {...}}: median ms, fastest round ms per implementation."""
    result = {}
    for index, pass_name in enumerate(("forward", "forward_backward")):
        samples = time_interleaved({name: fns[index] for name, fns in impls.items()}, rounds, MIN_ROUND_S,
                                   synchronize=torch.cuda.synchronize if device == "cuda" else None)
        result[pass_name] = {
            "ms": {name: statistics.median(times) * 1e3 for name, times in samples.items()},
            "ms_fastest_round": {name: min(times) * 1e3 for name, times in samples.items()},
        }
    return result


def ratios(timings, baselines):
    """baseline time / fastgpt's time for each baseline measured, per pass."""
    return {
        pass_name: {f"{b}_over_fastgpt": t["ms"][b] / t["ms"]["fastgpt"] for b in baselines if b in t["ms"]}
        for pass_name, t in timings.items()
    }


def machine_facts(device):
    facts = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
             "load_average": os.getloadavg(), "torch": torch.__version__, "build_info": _C.build_info()}
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def print_record(case, record):
    for pass_name in ("forward", "forward_backward"):
        ms, r = record[pass_name]["ms"], record["ratios"][pass_name]
        print(f"{case:<34} {pass_name:<16} " + "  ".join(f"{n} {t:8.2f} ms" for n, t in ms.items())
              + "  | " + "  ".join(f"{n} {x:5.2f}x" for n, x in r.items()), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: the native kernels; cuda: the Triton kernels (default cpu)")
    parser.add_argument("--quick", action="store_true", help="one window case, no varlen, fewer rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of interleaved timing (default 7; 3 quick)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<machine>-<date>-window.json)")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    rounds = args.rounds or (3 if args.quick else 7)
    out = args.out or default_out("window", device)
    torch.manual_seed(0)

    measurements = []
    for batch, heads, seq, head_dim, left, dtype in (QUICK_WINDOW_CASES if args.quick else WINDOW_CASES)[device]:
        timings = measure(window_implementations(batch, heads, seq, head_dim, left, dtype, device), rounds, device)
        record = {
            "kind": "window", "batch": batch, "heads": heads, "seq": seq, "head_dim": head_dim,
            "window": [left, 0], "causal": True, "dtype": str(dtype).removeprefix("torch."),
            **timings, "ratios": ratios(timings, ("sdpa_mask", "fastgpt_causal", "sdpa_causal", "flash_attn")),
        }
        measurements.append(record)
        print_record(f"window {left + 1} {batch}x{heads}x{seq} d{head_dim} {record['dtype']}", record)

    for lengths, heads, head_dim, dtype in [] if args.quick else VARLEN_CASES[device]:
        timings = measure(varlen_implementations(lengths, heads, head_dim, dtype, device), rounds, device)
        record = {
            "kind": "varlen", "lengths": list(lengths), "heads": heads, "head_dim": head_dim, "causal": True,
            "dtype": str(dtype).removeprefix("torch."), **timings, "ratios": ratios(timings, ("sdpa_loop",)),
        }
        measurements.append(record)
        print_record(f"varlen {list(lengths)} h{heads} d{head_dim} {record['dtype']}", record)

    write_result(
        out,
        "fastgpt-window-bench/2",
        machine=machine_facts(device),
        settings={
            "device": device, "backend": KERNEL_BACKEND[device], "rounds": rounds, "min_round_s": MIN_ROUND_S,
            "statistic": "ms: median over rounds of the mean per call in a round; ms_fastest_round: the fastest round",
            "timed": f"public ops (fastgpt.ops.attention / varlen_attention with backend='{KERNEL_BACKEND[device]}', "
                     "F.scaled_dot_product_attention); forward_backward includes the backward through autograd",
        },
        measurements=measurements,
    )


if __name__ == "__main__":
    main()
