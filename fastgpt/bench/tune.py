"""``fastgpt bench --tune``: measure which backend is fastest for each bucket of ``auto``'s table on
this machine, and write the table (``fastgpt/auto_rule.py`` says how it is read).

Each bucket is timed on one typical shape: every backend ``auto`` may use on the device runs the
same inputs, their calls interleaved in blocks (``fastgpt.bench.timing.time_interleaved``, so a busy
moment of a shared machine hits all of them), and the medians are compared. A fastgpt backend is
chosen over torch's kernels only when it is faster by more than ``MARGIN``: ``auto`` must never be
slower than torch by more than noise.
"""

import datetime
import json
import os

import torch

from fastgpt import auto_rule, dispatch, ops, registry
from fastgpt.bench.machine import machine_info
from fastgpt.bench.settings import DTYPE_NAMES, Settings
from fastgpt.bench.timing import TIMING_BLOCKS, time_interleaved

MARGIN = 0.05  # a fastgpt kernel must beat torch's by 5% of its time to be picked
BASELINE = "torch"

# (batch, heads, kv_heads, seq_q, seq_k, head_dim): one typical call per attention bucket
ATTENTION_SHAPES = {
    "decode/d64": (1, 12, 12, 1, 1024, 64),  # an MHA KV-cache step, short cache
    "decode/d128": (1, 32, 8, 1, 4096, 128),  # a GQA KV-cache step, long cache
    "short/d64": (4, 8, 8, 256, 256, 64),
    "short/d128": (2, 8, 8, 256, 256, 128),
    "long/d64": (1, 8, 8, 1024, 1024, 64),
    "long/d128": (1, 8, 8, 1024, 1024, 128),
}
# (rows, hidden): one typical call per add+LayerNorm bucket
ADD_LAYER_NORM_SHAPES = {
    "few/h512": (16, 512),
    "few/h2048": (16, 2048),
    "few/wide": (16, 4096),
    "many/h512": (4096, 512),
    "many/h2048": (2048, 2048),
    "many/wide": (512, 8192),
}
SIZE_SCALE = {"full": 1, "quick": 1, "tiny": 8}  # tiny (tests) divides the long dimensions


def tune_dtypes(device):
    return [torch.float32, torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16, torch.float32]


def _attention_inputs(shape, dtype, device, training, scale):
    b, h, kv, sq, sk, d = shape
    sq, sk = max(1, sq // scale) if sq > 4 else sq, max(4, sk // scale)
    q = torch.randn(b, h, sq, d, device=device, dtype=dtype)
    k, v = (torch.randn(b, kv, sk, d, device=device, dtype=dtype) for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_(training)
    return (q, k, v)


def _add_layer_norm_inputs(shape, dtype, device, training, scale):
    rows, hidden = shape
    rows = max(1, rows // scale)
    x, residual = (torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=training) for _ in range(2))
    weight, bias = (torch.randn(hidden, device=device, dtype=dtype, requires_grad=training) for _ in range(2))
    return (x, residual, weight, bias)


def _step(op, backend, inputs, training):
    """One call of ``op`` on ``backend`` through fastgpt.ops (what a user runs), with its backward
    when ``training``."""
    if op == "attention":

        def forward(_input_set=0):  # one input set: the timing's step(i) signature
            return ops.attention(*inputs, causal=True, backend=backend)
    else:

        def forward(_input_set=0):
            return ops.add_layer_norm(*inputs, backend=backend)[0]

    if not training:
        return forward

    def forward_backward(_input_set=0):
        out = forward()
        grads = torch.autograd.grad(out, [t for t in inputs if t is not None], torch.ones_like(out))
        return grads

    return forward_backward


def _settings(device, sizes, budget_s):
    """How one bucket is timed (``fastgpt.bench.timing``): ``budget_s`` of repetitions per backend."""
    return Settings(device=device, sizes=sizes, budget_s=budget_s, min_reps=TIMING_BLOCKS, max_reps=3000, warmup=1,
                    compile_skip_reason=None, rotate_bytes=0)


def _buckets(device, dtypes):
    """(op, bucket key, shape, dtype, training) for every bucket that is tuned."""
    for dtype in dtypes:
        for training in (False, True):
            for kind, shape in ATTENTION_SHAPES.items():
                if training and kind.startswith("decode"):
                    continue  # a KV-cache step is inference: the default order applies
                yield "attention", shape, dtype, training
            for kind, shape in ADD_LAYER_NORM_SHAPES.items():
                yield "add_layer_norm", shape, dtype, training


def tune(device, dtypes=None, sizes="full", budget_s=1.0, command=None, log=print):
    """Measure every bucket on ``device``, each in about ``budget_s`` of timed calls; returns the
    table (a dict, see ``auto_rule.read_table``)."""
    dtypes = dtypes or tune_dtypes(device)
    scale = SIZE_SCALE.get(sizes, 1)
    candidates = [b.name for b in registry.auto_candidates(device)]
    choices = {}
    for op, shape, dtype, training in _buckets(device, dtypes):
        make = _attention_inputs if op == "attention" else _add_layer_norm_inputs
        inputs = make(shape, dtype, device, training, scale)
        key = auto_rule.bucket(op, inputs, training)
        runnable = [name for name in candidates if dispatch.unsupported_reason(op, name, inputs) is None]
        if BASELINE not in runnable or len(runnable) < 2:
            log(f"{key}: nothing to compare ({', '.join(runnable) or 'no backend'} runs it)")
            continue
        steps = {name: _step(op, name, inputs, training) for name in runnable}
        timings = time_interleaved(steps, 1, _settings(device, sizes, budget_s / len(steps)))
        ms = {name: timing.median_ms for name, timing in timings.items()}
        best = min(ms, key=ms.get)
        chosen = best if best == BASELINE or ms[best] < (1 - MARGIN) * ms[BASELINE] else BASELINE
        choices[key] = {
            "backend": chosen,
            "shape": [list(t.shape) for t in inputs if t is not None],
            "ms": {name: round(t, 4) for name, t in ms.items()},
            "speedup_vs_torch": round(ms[BASELINE] / ms[chosen], 3),
        }
        log(f"{key:45s} {chosen:7s} " + "  ".join(f"{n} {t:.3f} ms" for n, t in ms.items()))
    return {
        "schema": auto_rule.SCHEMA,
        "device_class": auto_rule.device_class(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "rule": f"the fastest backend of each bucket, torch's kernels unless another is {MARGIN:.0%} faster",
        "dtypes": [DTYPE_NAMES[d] for d in dtypes],
        "sizes": sizes,
        "machine": machine_info(device),
        "choices": choices,
    }


def write_table(table, path):
    """Write ``table`` to ``path`` atomically and make ``auto`` read tables again."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    dispatch.forget_decisions()
    return path
