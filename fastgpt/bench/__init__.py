"""``fastgpt bench``: time fastgpt's ops and GPT against what a user would otherwise pick.

Every number is put next to two yardsticks measured in the same run, on the same machine:

- the alternatives a user would pick — eager PyTorch, ``torch.compile`` of the same expression,
  ``F.scaled_dot_product_attention`` (default dispatch and each SDPA backend on its own) and
  ``flash_attn`` when installed — as a ratio ``their time / our time`` (above 1: fastgpt is faster);
- the device's ceilings — copy bandwidth (bytes read + written) and a large matmul (bf16 on a
  GPU, fp32 on the CPU) — as a percent.

FLOP and byte conventions (DESIGN.md): attention forward ``4·b·h·sq·sk·d``, halved when causal,
forward+backward 3.5× the forward; add+LayerNorm forward reads x, residual, weight, bias and
writes y, h; its backward reads dy, h, weight, mean, rstd and writes dx, dweight, dbias.

Timing: CUDA events around each call on a GPU, ``time.perf_counter`` on the CPU; warm-up calls
excluded; median and 20th/80th percentiles over the repetitions. Each case cycles through several
input sets so that caches do not flatter small sizes.

Output: a table on stdout, ``results.json`` (machine, ceilings, every measurement) and one PNG per
op in ``--out``. ``python -m fastgpt.bench --help`` lists the options.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import ops, registry

DESCRIPTION = (
    "Time fastgpt's ops and GPT against eager PyTorch, torch.compile and SDPA, and against this "
    "machine's copy bandwidth and matmul rate, all measured in the same run."
)
OPS = ("attention", "add_layer_norm", "model")
SCHEMA = "fastgpt-bench/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PASSES = ("fwd", "fwd+bwd")
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")

# Implementations that materialize the (b, h, sq, sk) score matrix are skipped above this many
# bytes of fp32 scores: past it they would only measure the allocator (or run out of memory).
SCORE_BYTES_LIMIT = {"cuda": 16 << 30, "cpu": 2 << 30}


# ----------------------------------------------------------------------------- sizes


def attention_sizes(device, sizes):
    """[(batch, heads, seq, head_dim, causal)] to sweep. GPU: 16k tokens per batch, heads·d = 2048."""
    if sizes == "tiny":
        return [(1, 2, 64, 32, True)]
    if device == "cpu":
        seqs = [256] if sizes == "quick" else [256, 512, 1024, 2048]
        causals = [True] if sizes == "quick" else [True, False]
        return [(4, 8, s, 64, c) for c in causals for s in seqs]
    if sizes == "quick":  # both head dims causal, one non-causal: compiling the baselines dominates
        variants, seqs = [(64, True), (128, True), (128, False)], [1024, 4096]
    else:
        variants, seqs = [(d, c) for d in (64, 128) for c in (True, False)], [512, 1024, 2048, 4096, 8192, 16384]
    return [(16384 // s, 2048 // d, s, d, c) for d, c in variants for s in seqs]


def add_layer_norm_sizes(device, sizes):
    """[(rows, hidden)] to sweep."""
    if sizes == "tiny":
        return [(64, 128)]
    if device == "cpu":
        return [(2048, 1024)] if sizes == "quick" else [(8192, n) for n in (256, 512, 1024, 2048, 4096)]
    if sizes == "quick":
        return [(8192, 1024), (8192, 4096)]
    return [(rows, n) for rows in (4096, 16384) for n in (768, 1024, 2048, 4096, 8192, 12288, 16384)]


def model_configs(device, sizes):
    """[(GPTConfig keyword arguments, batch)] for the end-to-end training step."""
    if sizes == "tiny":
        cfg = dict(vocab_size=256, context_length=32, n_layers=1, n_heads=2, n_kv_heads=2, d_model=32, d_ff=128)
        return [(cfg, 2)]
    if device == "cpu":
        ctx, d_model = (128, 128) if sizes == "quick" else (256, 256)
        cfg = dict(vocab_size=4096, context_length=ctx, n_layers=2, n_heads=4, n_kv_heads=4, d_model=d_model)
        cfg["d_ff"] = 4 * d_model
        return [(cfg, 4)]
    n_layers = 4 if sizes == "quick" else 12  # GPT-2 small shape; fewer layers keep --quick quick
    cfg = dict(vocab_size=50304, context_length=1024, n_layers=n_layers, n_heads=12, n_kv_heads=12, d_model=768)
    cfg["d_ff"] = 3072
    return [(cfg, 8)]


def default_dtypes(op, device):
    if device == "cpu":
        return [torch.float32]
    return [torch.bfloat16, torch.float32] if op == "add_layer_norm" else [torch.bfloat16]


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int


@dataclass
class Settings:
    device: str
    sizes: str  # "full", "quick" or "tiny"
    budget_s: float  # wall time each measurement may spend on timed repetitions
    min_reps: int
    max_reps: int
    warmup: int
    compile_skip_reason: Optional[str]  # None: time torch.compile baselines
    rotate_bytes: int  # input sets cycled per case add up to at least this many bytes
    dtypes: Optional[list] = None
    notes: list = field(default_factory=list)


def _percentile(sorted_values, q):
    """Linear-interpolated percentile of an already sorted list."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _summarize(times_ms):
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


def time_calls(step, n_sets, settings):
    """Time ``step(i)`` (i cycling over the input sets): warm-up excluded, median and p20/p80 in ms."""
    reps = warm_up(step, n_sets, settings)
    return _summarize(timed_calls(step, 0, reps, n_sets, settings))


def input_set_count(set_bytes, settings):
    """How many input sets to cycle so that together they outgrow the last-level cache."""
    return int(min(64, max(2, math.ceil(settings.rotate_bytes / max(set_bytes, 1)))))


def _last_level_cache_bytes(device):
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 32 << 20


# ----------------------------------------------------------------------------- machine and ceilings


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_driver():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device):
    """What the numbers were measured on: CPU, GPU, driver and library versions, fastgpt backends."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = device == "cuda"
    props = torch.cuda.get_device_properties(0) if gpu else None
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_name": torch.cuda.get_device_name(0) if gpu else None,
        "gpu_sm_count": props.multi_processor_count if gpu else None,
        "gpu_memory_bytes": props.total_memory if gpu else None,
        "gpu_driver": _gpu_driver() if gpu else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if gpu else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fastgpt": fastgpt.__version__,
        "backends": backend_report(),
    }


def measure_ceilings(settings):
    """Copy bandwidth (GB/s, bytes read + written) and matmul rate (TFLOP/s) measured now, each
    from its fastest repetition: a ceiling is what the device can do, not what it does typically."""
    device, sizes = settings.device, settings.sizes
    if device == "cuda":
        copy_bytes, mm_n, mm_dtype = (1 << 30), 8192, torch.bfloat16
    else:  # the full run copies 1 GiB, well past any last-level cache
        copy_bytes = {"tiny": 8 << 20, "quick": 64 << 20}.get(sizes, 1 << 30)
        mm_n = {"tiny": 256, "quick": 1024}.get(sizes, 2048)
        mm_dtype = torch.float32
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_calls(lambda i, dst=dst, src=src: dst.copy_(src), 1, settings)
    copy = {"gbps": 2 * copy_bytes / t.min_ms / 1e6, "bytes": 2 * copy_bytes, **t.__dict__}
    del src, dst
    a = torch.randn(mm_n, mm_n, device=device, dtype=mm_dtype)
    b = torch.randn(mm_n, mm_n, device=device, dtype=mm_dtype)
    t = time_calls(lambda i: torch.mm(a, b), 1, settings)
    matmul = {"tflops": 2 * mm_n**3 / t.min_ms / 1e9, "n": mm_n, "dtype": DTYPE_NAMES[mm_dtype], **t.__dict__}
    return {"copy": copy, "matmul": matmul}


def best_ceilings(*measured):
    """The highest copy bandwidth and matmul rate among several measurements (start and end of a
    run), so that a busy moment does not lower the ceiling and inflate every percentage."""
    return {
        "copy": max((m["copy"] for m in measured), key=lambda c: c["gbps"]),
        "matmul": max((m["matmul"] for m in measured), key=lambda c: c["tflops"]),
    }


# ----------------------------------------------------------------------------- cases and implementations


@dataclass
class Impl:
    """One way to compute an op: ``run(*inputs) -> output`` (differentiable), or why it cannot."""

    name: str
    kind: str  # "fastgpt" or "baseline"
    run: Optional[Callable] = None
    skip_reason: Optional[str] = None


def backend_report():
    """``fastgpt.backends()``, or — when even asking fails (a half-installed package) — every
    backend but the reference marked unavailable with the error, so the baselines still run."""
    try:
        return fastgpt.backends()
    except Exception as exc:
        reason = f"fastgpt.backends() raised {type(exc).__name__}: {_first_line(exc)}"
        report = {name: {"available": False, "reason": reason} for name in registry.names()}
        report["reference"] = {"available": True, "reason": "plain PyTorch, runs anywhere"}
        return report


def _fastgpt_impls(op_fn, device):
    impls = []
    for name, info in backend_report().items():
        if name == "torch":  # torch's own kernels are the baselines, measured as such
            continue
        impl_name = f"fastgpt/{name}"
        if not info["available"]:
            impls.append(Impl(impl_name, "fastgpt", skip_reason=f"unavailable: {info['reason']}"))
        elif name == "triton" and device == "cpu":
            reason = "Triton on the CPU is its interpreter: not benchmarked"
            impls.append(Impl(impl_name, "fastgpt", skip_reason=reason))
        else:
            impls.append(Impl(impl_name, "fastgpt", run=op_fn(name)))
    return impls


def _compiled(fn, settings):
    if settings.compile_skip_reason:
        return Impl("torch.compile", "baseline", skip_reason=settings.compile_skip_reason)
    return Impl("torch.compile", "baseline", run=torch.compile(fn))


def eager_attention(q, k, v, causal):
    """The textbook attention a user writes: scores, causal mask, softmax, weighted sum."""
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if causal:
        sq, sk = scores.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _sdpa_impl(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = f"sdpa/{backend_name.split('_')[0].lower()}"
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        return Impl(name, "baseline", skip_reason=f"this torch has no SDPBackend.{backend_name}")

    def run(q, k, v, causal):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return Impl(name, "baseline", run=run)


def attention_impls(settings):
    """Every implementation of causal attention this machine can time, fastgpt's first."""

    def fastgpt_attention(backend):
        return lambda q, k, v, causal: ops.attention(q, k, v, causal=causal, backend=backend)

    impls = _fastgpt_impls(fastgpt_attention, settings.device)
    impls.append(Impl("torch eager", "baseline", run=eager_attention))
    impls.append(_compiled(eager_attention, settings))
    impls.append(Impl("sdpa", "baseline", run=lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c)))
    try:
        impls.extend(_sdpa_impl(name) for name in SDPA_BACKENDS)
    except ImportError as exc:  # torch < 2.3 has no torch.nn.attention.sdpa_kernel
        impls.append(Impl("sdpa/<backends>", "baseline", skip_reason=f"torch.nn.attention.sdpa_kernel missing: {exc}"))
    try:
        from flash_attn import flash_attn_func

        # flash_attn wants (b, s, h, d): a transposed view costs nothing and keeps the inputs shared
        def run_flash_attn(q, k, v, causal):
            o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
            return o.transpose(1, 2)

        impls.append(Impl("flash_attn", "baseline", run=run_flash_attn))
    except ImportError as exc:
        impls.append(Impl("flash_attn", "baseline", skip_reason=f"not installed ({exc})"))
    return impls


def eager_add_layer_norm(x, residual, weight, bias):
    """What a user writes without fastgpt: the residual add, then F.layer_norm."""
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, 1e-5)


def add_layer_norm_impls(settings):
    def fastgpt_add_layer_norm(backend):
        return lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, 1e-5, backend=backend)[0]

    impls = _fastgpt_impls(fastgpt_add_layer_norm, settings.device)
    impls.append(Impl("torch eager", "baseline", run=eager_add_layer_norm))
    impls.append(_compiled(eager_add_layer_norm, settings))
    return impls


@dataclass
class Case:
    """One point of a sweep: its inputs, the work it does, and what to record about it."""

    op: str
    pass_: str
    shape: dict
    dtype: torch.dtype
    flops: Optional[float]
    bytes: Optional[float]
    make_inputs: Callable  # () -> one fresh input set (tuple of tensors; the last is the output gradient)
    extra_args: tuple = ()  # passed after the tensors, e.g. causal
    materialized_bytes: int = 0  # fp32 bytes of the score matrix an unfused implementation builds


def attention_cases(settings):
    for dtype in settings.dtypes or default_dtypes("attention", settings.device):
        for b, h, s, d, causal in attention_sizes(settings.device, settings.sizes):
            fwd_flops = 4 * b * h * s * s * d / (2 if causal else 1)
            es = torch.tensor([], dtype=dtype).element_size()

            def make(b=b, h=h, s=s, d=d, dtype=dtype):
                shape = (b, h, s, d)
                return tuple(torch.randn(shape, device=settings.device, dtype=dtype) for _ in range(4))

            for pass_ in PASSES:
                yield Case(
                    "attention",
                    pass_,
                    {"batch": b, "heads": h, "seq": s, "head_dim": d, "causal": causal},
                    dtype,
                    fwd_flops * (1 if pass_ == "fwd" else 3.5),
                    4 * b * h * s * d * es * (1 if pass_ == "fwd" else 2.5),
                    make,
                    (causal,),
                    4 * b * h * s * s,
                )


def add_layer_norm_cases(settings):
    for dtype in settings.dtypes or default_dtypes("add_layer_norm", settings.device):
        es = torch.tensor([], dtype=dtype).element_size()
        for rows, n in add_layer_norm_sizes(settings.device, settings.sizes):

            def make(rows=rows, n=n, dtype=dtype):
                dev = settings.device
                return (
                    torch.randn(rows, n, device=dev, dtype=dtype),
                    torch.randn(rows, n, device=dev, dtype=dtype),
                    1 + 0.1 * torch.randn(n, device=dev, dtype=dtype),
                    0.1 * torch.randn(n, device=dev, dtype=dtype),
                    torch.randn(rows, n, device=dev, dtype=dtype),
                )

            fwd_bytes = 4 * rows * n * es + 2 * n * es  # read x, residual, weight, bias; write y, h
            bwd_bytes = 3 * rows * n * es + 3 * n * es + 2 * rows * 4  # dy, h, dx; weight, dweight, dbias; mean, rstd
            for pass_ in PASSES:
                yield Case(
                    "add_layer_norm",
                    pass_,
                    {"rows": rows, "hidden": n},
                    dtype,
                    None,
                    fwd_bytes + (bwd_bytes if pass_ == "fwd+bwd" else 0),
                    make,
                )


def _step_for(impl, case, input_sets):
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


def _skip_reason(impl, case, settings):
    if impl.skip_reason:
        return impl.skip_reason
    materializes = impl.name in ("torch eager", "torch.compile", "fastgpt/reference", "sdpa/math")
    limit = SCORE_BYTES_LIMIT[settings.device]
    if materializes and case.materialized_bytes > limit:
        return f"builds a {case.materialized_bytes / 2**30:.0f} GiB score matrix (limit {limit / 2**30:.0f} GiB)"
    return None


def _first_line(obj, limit=300):
    text = str(obj).strip()
    return text.splitlines()[0][:limit] if text else ""


def _record(case, impl, settings, status, reason=None, timing=None, n_sets=0, page_faults=None):
    rec = {
        "op": case.op,
        "pass": case.pass_,
        "shape": case.shape,
        "dtype": DTYPE_NAMES[case.dtype],
        "device": settings.device,
        "implementation": impl.name,
        "kind": impl.kind,
        "status": status,
        "reason": reason,
        "input_sets": n_sets,
        "flops": case.flops,
        "bytes": case.bytes,
    }
    if timing is not None:
        rec.update(timing.__dict__)
        seconds = timing.median_ms / 1e3
        rec["tflops"] = case.flops / seconds / 1e12 if case.flops else None
        rec["gbps"] = case.bytes / seconds / 1e9 if case.bytes else None
        if page_faults is not None:
            rec["page_faults_per_call"] = page_faults / timing.reps
    return rec


def _page_faults(device):
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


# Each implementation's timed repetitions are taken in this many blocks, in turn with the other
# implementations' blocks (A B C A B C ...): a slow spell of a shared machine then falls on every
# implementation alike, instead of on whichever happened to run during it.
TIMING_BLOCKS = 3


def _failure(exc, impl, caught, settings):
    """(status, reason) of an implementation that raised: a baseline or a backend declining the
    inputs is skipped; any other fastgpt failure is an error. SDPA says why a backend refuses the
    inputs in warnings, then raises a vaguer error: the warnings join the reason."""
    status = "skipped" if impl.kind == "baseline" or isinstance(exc, ops.BackendError) else "error"
    why = [_first_line(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if settings.device == "cuda":
        torch.cuda.empty_cache()
    return status, f"{type(exc).__name__}: {_first_line(exc)}" + "".join(f" [{w}]" for w in why[:2])


def run_cases(cases, impls, settings, emit):
    """Time every implementation on every case, their repetitions interleaved in TIMING_BLOCKS
    blocks; ``emit(record)`` receives each result, in the order of ``impls``."""
    for case in cases:
        probe = case.make_inputs()
        set_bytes = sum(t.numel() * t.element_size() for t in probe)
        n_sets = input_set_count(set_bytes, settings)
        input_sets = [probe] + [case.make_inputs() for _ in range(n_sets - 1)]
        if case.pass_ == "fwd+bwd":
            for inputs in input_sets:
                for t in inputs[:-1]:
                    t.requires_grad_(True)
        records, timed = {}, {}  # impl index -> record; impl index -> (step, reps, times, page faults)
        for index, impl in enumerate(impls):
            reason = _skip_reason(impl, case, settings)
            if reason is not None:
                records[index] = _record(case, impl, settings, "skipped", reason)
                continue
            step = _step_for(impl, case, input_sets)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    timed[index] = (step, warm_up(step, n_sets, settings), [], [])
                except Exception as exc:  # an unavailable kernel or an out-of-memory must not end the run
                    records[index] = _record(case, impl, settings, *_failure(exc, impl, caught, settings))
        for block in range(TIMING_BLOCKS):
            for index, (step, reps, times, faults) in list(timed.items()):
                count = reps // TIMING_BLOCKS + (1 if block < reps % TIMING_BLOCKS else 0)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        faults_before = _page_faults(settings.device)
                        times += timed_calls(step, len(times), count, n_sets, settings)
                        if faults_before is not None:
                            faults.append(_page_faults(settings.device) - faults_before)
                    except Exception as exc:  # noqa: BLE001 - recorded, and the others go on
                        failure = _failure(exc, impls[index], caught, settings)
                        records[index] = _record(case, impls[index], settings, *failure)
                        del timed[index]
        for index, (_, _, times, faults) in timed.items():
            records[index] = _record(
                case, impls[index], settings, "ok", timing=_summarize(times), n_sets=n_sets,
                page_faults=sum(faults) if faults else None,
            )
        for index in sorted(records):
            emit(records[index])
        del input_sets, probe, timed


# ----------------------------------------------------------------------------- end-to-end model


def model_impls(settings):
    """(name, kind, GPTConfig backend, compiled?) for the training-step benchmark."""
    return [
        ("fastgpt/auto", "fastgpt", "auto", False),
        ("fastgpt/reference", "fastgpt", "reference", False),
        ("torch", "baseline", "torch", False),
        ("torch.compile", "baseline", "torch", True),
    ]


def _cpu_step_peak_bytes(step):
    """Peak bytes a training step allocates on the CPU above what it starts with: torch keeps no
    CPU allocator statistics, so replay the profiler's allocations and frees in order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(0)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def peak_training_memory(step, device):
    """(bytes, how they were counted) of one training step: parameters, optimizer state and the
    step's own peak (activations, gradients, temporaries)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(0)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated over one step"
    peak = step.resident_bytes() + _cpu_step_peak_bytes(step)
    return peak, "parameters + optimizer state + the step's peak allocations (torch.profiler, profile_memory)"


def make_train_step(cfg_kwargs, batch, backend, compiled, device, dtype):
    """``step(i)``: one AdamW training step of a fresh ``fastgpt.nn.GPT`` on token batch ``i % 2``."""
    from fastgpt.nn import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg_kwargs, dropout=0.0), backend=backend).to(device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compiled else model
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (batch, cfg_kwargs["context_length"] + 1)
    batches = [torch.randint(0, cfg_kwargs["vocab_size"], shape, generator=gen).to(device) for _ in range(2)]

    def step(i):
        idx = batches[i % 2]
        _, loss = forward(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def resident_bytes():
        """Bytes held between steps: parameters, buffers, optimizer state (gradients are freed)."""
        tensors = list(model.parameters()) + list(model.buffers())
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    step.resident_bytes = resident_bytes
    return step


def run_model(settings, emit):
    """Training-step tokens/s and peak memory of fastgpt.nn.GPT for each backend; ``emit(record)``
    receives each result."""
    try:
        import fastgpt.nn  # noqa: F401
    except ImportError as exc:
        emit({"op": "model", "implementation": "all", "status": "skipped", "reason": f"fastgpt.nn missing: {exc}"})
        return
    dtype = (settings.dtypes or [torch.bfloat16 if settings.device == "cuda" else torch.float32])[0]
    for cfg_kwargs, batch in model_configs(settings.device, settings.sizes):
        tokens = batch * cfg_kwargs["context_length"]
        shape = {"batch": batch, **cfg_kwargs}
        for name, kind, backend, compiled in model_impls(settings):
            rec = {
                "op": "model",
                "pass": "train_step",
                "shape": shape,
                "dtype": DTYPE_NAMES[dtype],
                "device": settings.device,
                "implementation": name,
                "kind": kind,
                "status": "ok",
                "reason": None,
                "tokens": tokens,
            }
            if compiled and settings.compile_skip_reason:
                rec.update(status="skipped", reason=settings.compile_skip_reason)
                emit(rec)
                continue
            try:
                step = make_train_step(cfg_kwargs, batch, backend, compiled, settings.device, dtype)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    timing = time_calls(step, 2, settings)
                rec.update(timing.__dict__)
                rec["tokens_per_s"] = tokens / (timing.median_ms / 1e3)
                rec["peak_memory_bytes"], rec["peak_memory_kind"] = peak_training_memory(step, settings.device)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {_first_line(exc)}"
                rec.update(status="error" if kind == "fastgpt" else "skipped", reason=reason)
            finally:
                step = None  # frees the model and optimizer state before the next one
                if settings.device == "cuda":
                    torch.cuda.empty_cache()
            emit(rec)


# ----------------------------------------------------------------------------- ratios, table, plots


def _case_key(rec):
    return (rec["op"], rec["pass"], json.dumps(rec["shape"], sort_keys=True), rec["dtype"], rec["device"])


def add_ratios(records, ceilings):
    """Give each timed record ``speedup`` (other's time / this time) against every alternative
    measured at the same point, ``best_alternative`` and percent of the ceilings."""
    by_case = {}
    for rec in records:
        if rec.get("status") == "ok":
            by_case.setdefault(_case_key(rec), []).append(rec)
    for group in by_case.values():
        for rec in group:
            rec["speedup"] = {
                other["implementation"]: other["median_ms"] / rec["median_ms"] for other in group if other is not rec
            }
            baselines = [o for o in group if o["kind"] == "baseline"]
            if baselines and rec["kind"] == "fastgpt":
                best = min(baselines, key=lambda o: o["median_ms"])
                rec["best_alternative"] = best["implementation"]
                rec["speedup_vs_best_alternative"] = best["median_ms"] / rec["median_ms"]
            if rec.get("tflops") is not None and ceilings:
                rec["pct_of_matmul_ceiling"] = 100 * rec["tflops"] / ceilings["matmul"]["tflops"]
            if rec.get("gbps") is not None and ceilings:
                rec["pct_of_copy_ceiling"] = 100 * rec["gbps"] / ceilings["copy"]["gbps"]
    return records


def format_line(rec):
    """One line of the progress table."""
    keys = ("batch", "heads", "seq", "head_dim", "causal", "rows", "hidden", "n_layers", "d_model", "context_length")
    shape = ",".join(f"{k}={v}" for k, v in rec.get("shape", {}).items() if k in keys)
    head = f"{rec['op']:<14} {rec.get('pass', ''):<10} {rec.get('dtype', ''):<5} {shape:<48}"
    head += f" {rec['implementation']:<18}"
    if rec.get("status") != "ok":
        return f"{head} {rec['status']}: {rec.get('reason')}"
    rate = ""
    if rec.get("tflops") is not None:
        rate = f"{rec['tflops']:8.2f} TFLOP/s"
    elif rec.get("gbps") is not None:
        rate = f"{rec['gbps']:8.1f} GB/s"
    elif rec.get("tokens_per_s") is not None:
        rate = f"{rec['tokens_per_s']:8.0f} tok/s"
    return f"{head} {rec['median_ms']:10.3f} ms [{rec['p20_ms']:.3f}..{rec['p80_ms']:.3f}] {rate}"


def write_plots(results, out_dir, stem):
    """One PNG per op, ``<stem>-<op>.png`` beside the JSON ``<stem>.json`` they are drawn from (so
    runs into one folder under different JSON names keep their own plots): rate against size, one
    line per implementation, the measured ceiling dotted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return [], [f"plots skipped: matplotlib is not installed ({exc})"]
    paths = []

    def save(fig, op):
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"{stem}-{op}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    ceilings = results.get("ceilings") or {}
    plans = {
        "attention": ("seq", "tflops", "TFLOP/s", ceilings.get("matmul", {}).get("tflops"), "matmul ceiling"),
        "add_layer_norm": ("hidden", "gbps", "GB/s", ceilings.get("copy", {}).get("gbps"), "copy ceiling"),
    }
    device = results["settings"]["device"]
    gpu = results["machine"].get("gpu_name") or results["machine"].get("cpu_model")
    for op, (x_field, y_field, y_label, ceiling, ceiling_label) in plans.items():
        recs = [r for r in results["measurements"] if r["op"] == op and r.get("status") == "ok"]
        if not recs:
            continue
        panels = {}
        for r in recs:
            key = (r["dtype"], r["pass"]) + tuple((k, v) for k, v in r["shape"].items() if k not in (x_field, "batch"))
            panels.setdefault(key, []).append(r)
        ncols = min(4, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False)
        for ax, (key, group) in zip(axes.flat, sorted(panels.items(), key=lambda kv: str(kv[0]))):
            for impl in sorted({r["implementation"] for r in group}):
                pts = sorted((r["shape"][x_field], r[y_field]) for r in group if r["implementation"] == impl)
                style = "-" if impl.startswith("fastgpt") else "--"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=3, label=impl)
            if ceiling:
                ax.axhline(ceiling, color="black", linestyle=":", linewidth=1, label=f"{ceiling_label} {ceiling:.3g}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x_field)
            ax.set_ylabel(y_label)
            ax.set_title(" ".join(f"{k[0]}={k[1]}" if isinstance(k, tuple) else str(k) for k in key), fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"fastgpt {op} on {device}: {gpu}", fontsize=10)
        save(fig, op)
    model = [r for r in results["measurements"] if r["op"] == "model" and r.get("status") == "ok"]
    if model:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([r["implementation"] for r in model], [r["tokens_per_s"] for r in model])
        ax.set_ylabel("training tokens/s")
        ax.set_title(f"GPT training step on {device}: {gpu}", fontsize=9)
        save(fig, "model")
    return paths, []


def _shape_text(shape):
    if "n_layers" in shape:
        return (
            f"{shape['n_layers']} layers, d_model {shape['d_model']}, "
            f"context {shape['context_length']}, batch {shape['batch']}"
        )
    keys = ("batch", "heads", "seq", "head_dim", "rows", "hidden")
    text = "×".join(str(shape[k]) for k in keys if k in shape)
    return text + (" causal" if shape.get("causal") else "") if "causal" in shape else text


def _ratio(rec, other):
    value = rec.get("speedup", {}).get(other)
    return f"{value:.2f}×" if value is not None else "–"


# a case is listed under the table when one implementation faults at least this often per call
_NOTABLE_PAGE_FAULTS = 1000


def _page_fault_lines(records):
    """Below the table: the cases where some implementation paid many page faults per call (CPU),
    with every implementation's count, since those faults can decide the ratio (see _page_faults)."""
    cases = {}
    for r in records:
        if r.get("status") == "ok" and r.get("page_faults_per_call") is not None:
            cases.setdefault(_case_key(r), []).append(r)
    lines = []
    for rs in cases.values():
        if max(r["page_faults_per_call"] for r in rs) >= _NOTABLE_PAGE_FAULTS:
            counts = ", ".join(f"{r['implementation']} {r['page_faults_per_call']:.0f}" for r in rs)
            lines.append(f"- {rs[0]['op']} {rs[0]['pass']} {_shape_text(rs[0]['shape'])}: {counts}")
    if not lines:
        return []
    return ["", "Page faults per call (first touches of freshly mapped memory, which the OS must zero):"] + lines


def markdown_table(results, compact=False):
    """The README table: each fastgpt measurement, its rate, percent of ceiling and speed-ups
    (other's time / fastgpt's time: above 1 means fastgpt is faster) against the alternatives.
    ``compact``: only the fastest fastgpt backend of each case, and no list of what was skipped."""
    m = results["machine"]
    ceil = results.get("ceilings") or {}
    lines = [
        f"Device: {m.get('gpu_name') or m.get('cpu_model')} ({results['settings']['device']}, "
        f"{m.get('cpu_cores')} CPU cores; torch {m.get('torch')}, triton {m.get('triton')}, CUDA {m.get('cuda')}, "
        f"driver {m.get('gpu_driver')}). Ceilings measured in the same run: copy "
        f"{ceil.get('copy', {}).get('gbps', float('nan')):.1f} GB/s, {ceil.get('matmul', {}).get('dtype')} matmul "
        f"{ceil.get('matmul', {}).get('tflops', float('nan')):.2f} TFLOP/s.",
        "",
    ]
    ok = [r for r in results["measurements"] if r.get("status") == "ok" and r.get("kind") == "fastgpt"]
    kernels = [r for r in ok if r["op"] != "model"]
    if compact:
        fastest = {}
        for r in kernels:
            key = _case_key(r)
            if key not in fastest or r["median_ms"] < fastest[key]["median_ms"]:
                fastest[key] = r
        kernels = [r for r in kernels if fastest[_case_key(r)] is r]
    if kernels:
        lines += [
            "| op | pass | shape | dtype | backend | median ms | rate | % of ceiling "
            "| vs eager | vs torch.compile | vs SDPA | vs best alternative |",
            "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in kernels:
            if r.get("tflops") is not None and r["op"] == "attention":
                rate, pct = f"{r['tflops']:.2f} TFLOP/s", r.get("pct_of_matmul_ceiling")
            else:
                rate, pct = f"{r['gbps']:.1f} GB/s", r.get("pct_of_copy_ceiling")
            best = r.get("speedup_vs_best_alternative")
            best_text = f"{best:.2f}× ({r['best_alternative']})" if best else "–"
            lines.append(
                f"| {r['op']} | {r['pass']} | {_shape_text(r['shape'])} | {r['dtype']} "
                f"| {r['implementation'].split('/')[-1]} | {r['median_ms']:.3f} | {rate} | {pct:.1f}% "
                f"| {_ratio(r, 'torch eager')} | {_ratio(r, 'torch.compile')} "
                f"| {_ratio(r, 'sdpa') if r['op'] == 'attention' else '–'} "
                f"| {best_text} |"
            )
    lines += _page_fault_lines(results["measurements"])
    model = [r for r in results["measurements"] if r["op"] == "model" and r.get("status") == "ok"]
    if model:
        lines += [
            "",
            "| GPT training step | shape | dtype | tokens/s | peak memory | vs plain torch | vs torch.compile |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for r in model:
            mem = f"{r['peak_memory_bytes'] / 2**20:.0f} MiB" if r.get("peak_memory_bytes") else "–"
            lines.append(
                f"| {r['implementation']} | {_shape_text(r['shape'])} | {r['dtype']} "
                f"| {r['tokens_per_s']:.0f} | {mem} | {_ratio(r, 'torch')} | {_ratio(r, 'torch.compile')} |"
            )
    not_ok = [r for r in results["measurements"] if r.get("status") != "ok"]
    skipped = sorted({(r["implementation"], r.get("reason")) for r in not_ok})
    if skipped and not compact:
        lines += ["", "Not measured:"] + [f"- {impl}: {reason}" for impl, reason in skipped]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def _dtype_list(text):
    try:
        return [DTYPES[name.strip()] for name in text.split(",") if name.strip()]
    except KeyError as exc:
        message = f"--dtype takes a comma-separated list of {sorted(DTYPES)}, got {text!r}"
        raise argparse.ArgumentTypeError(message) from exc


def add_arguments(parser):
    """The options of ``fastgpt bench``."""
    parser.add_argument("--op", choices=OPS + ("all",), default="all", help="what to time (default: all)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu"
    )
    parser.add_argument(
        "--dtype",
        type=_dtype_list,
        default=None,
        help="comma-separated fp32,bf16,fp16 (default: bf16, and fp32 for add_layer_norm, on cuda; fp32 on cpu)",
    )
    parser.add_argument("--quick", action="store_true", help="a few points per sweep (CPU: seconds; GPU: 2-3 minutes)")
    parser.add_argument(
        "--sizes",
        choices=("full", "quick", "tiny"),
        default=None,
        help="size set; tiny is a smoke test (overrides --quick)",
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baselines")
    parser.add_argument(
        "--out", default="benchmarks/results", help="folder for the JSON and the PNGs (default: benchmarks/results)"
    )
    parser.add_argument("--json-name", default="results.json", help="file name of the JSON inside --out")


def run(args, argv=None):
    """Run ``fastgpt bench`` with parsed ``args``; returns the exit status. ``argv``: the
    command-line arguments to record in the JSON (default: ``sys.argv[1:]``)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastgpt bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    sizes = args.sizes or ("quick" if args.quick else "full")
    compile_skip_reason = None
    if args.no_compile:
        compile_skip_reason = "torch.compile baselines turned off (--no-compile)"
    elif device == "cpu" and sizes != "full":
        compile_skip_reason = "left out of CPU --quick runs, which take seconds: compiling takes longer"
    settings = Settings(
        device=device,
        sizes=sizes,
        budget_s={"tiny": 0.02, "quick": 0.1 if device == "cuda" else 0.3}.get(sizes, 1.0),
        min_reps=5 if sizes == "full" or device == "cuda" else 3,
        max_reps=1000 if device == "cuda" else 200,
        warmup=3 if sizes == "full" or device == "cuda" else 1,
        compile_skip_reason=compile_skip_reason,
        # 4× the last-level cache; less for quick runs, where making the inputs would dominate
        rotate_bytes=min(4 * _last_level_cache_bytes(device), (256 << 20) if sizes != "full" else (2 << 30)),
        dtypes=args.dtype,
    )
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    wanted = OPS if args.op == "all" else (args.op,)
    print(f"fastgpt bench: {', '.join(wanted)} on {device} ({sizes} sizes) -> {args.out}", flush=True)
    ceilings = measure_ceilings(settings)
    print(
        f"ceilings: copy {ceilings['copy']['gbps']:.1f} GB/s, "
        f"{ceilings['matmul']['dtype']} matmul {ceilings['matmul']['tflops']:.2f} TFLOP/s",
        flush=True,
    )
    results = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv if argv is None else ["fastgpt", "bench", *argv]),
        "settings": {
            "device": device,
            "sizes": sizes,
            "ops": list(wanted),
            "dtypes": [DTYPE_NAMES[d] for d in args.dtype] if args.dtype else "default",
            "compile": settings.compile_skip_reason is None,
        },
        "machine": machine_info(device),
        "ceilings": ceilings,
        "measurements": [],
        "notes": settings.notes,
        "plots": [],
    }
    json_path = os.path.join(args.out, args.json_name)
    last_write = [0.0]

    def write_json(force=False):
        # every few seconds and at the end, so a run stopped by a timeout keeps what it measured
        if force or time.perf_counter() - last_write[0] > 5:
            add_ratios(results["measurements"], ceilings)
            with open(json_path, "w") as f:
                json.dump(results, f, indent=1)
            last_write[0] = time.perf_counter()

    def log(rec):
        print(format_line(rec), flush=True)
        results["measurements"].append(rec)
        write_json()

    runners = {
        "attention": lambda: run_cases(attention_cases(settings), attention_impls(settings), settings, log),
        "add_layer_norm": lambda: run_cases(
            add_layer_norm_cases(settings), add_layer_norm_impls(settings), settings, log
        ),
        "model": lambda: run_model(settings, log),
    }
    for op in OPS:  # the model last: the slowest, and fastgpt.nn may not be importable
        if op in wanted:
            runners[op]()
    print("measuring the ceilings again at the end of the run", flush=True)
    results["ceilings_measured"] = [ceilings, measure_ceilings(settings)]
    results["ceilings"] = ceilings = best_ceilings(*results["ceilings_measured"])
    add_ratios(results["measurements"], ceilings)
    pcts = [r.get(k, 0) for r in results["measurements"] for k in ("pct_of_matmul_ceiling", "pct_of_copy_ceiling")]
    over = [p for p in pcts if p > 100]
    if over:
        settings.notes.append(
            f"{len(over)} measurements exceed 100% of a ceiling: caches (small sizes) or a ceiling measured "
            "while the machine was busy; read those percentages with care"
        )
    plots, notes = write_plots(results, args.out, os.path.splitext(args.json_name)[0])
    results["plots"] = [os.path.basename(p) for p in plots]
    results["notes"] += notes
    write_json(force=True)
    records = results["measurements"]
    print()
    print(markdown_table(results))
    for note in results["notes"]:
        print(f"note: {note}")
    failed = [r for r in records if r.get("status") == "error"]
    for rec in failed:
        print(f"ERROR {rec['op']} {rec['implementation']} {rec.get('shape')}: {rec['reason']}")
    print(f"wrote {json_path}" + "".join(f", {p}" for p in plots))
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastgpt bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
