"""The model op: one AdamW training step of ``fastgpt.nn.GPT`` (forward, loss, backward, update),
its tokens/s and peak memory, and cached generation (``GPT.generate`` after a long prompt), on
fastgpt's backends against the same model on torch's kernels (``GPT(config, backend="torch")``)
and torch.compile of it; implementations interleaved, profiles of auto and torch kept."""

import warnings
from typing import NamedTuple

import torch

from fastgpt import registry
from fastgpt.bench.implementations import BASELINE_BACKEND
from fastgpt.bench.records import first_line
from fastgpt.bench.settings import DTYPE_NAMES
from fastgpt.bench.timing import time_interleaved


def model_configs(device, sizes):
    """[(GPTConfig keyword arguments, batch)] for the end-to-end training step: the presets, and
    (full runs) 4k-token contexts at head dim 64 and 128."""
    if sizes == "tiny":
        cfg = dict(vocab_size=256, context_length=32, n_layers=1, n_heads=2, n_kv_heads=2, d_model=32, d_ff=128)
        return [(cfg, 2)]
    if device == "cpu":
        small = dict(vocab_size=4096, context_length=128, n_layers=4, n_heads=4, n_kv_heads=4, d_model=128, d_ff=512)
        if sizes == "quick":
            return [(small, 8)]
        medium = dict(vocab_size=4096, context_length=256, n_layers=6, n_heads=8, n_kv_heads=8, d_model=256, d_ff=1024)
        long = dict(vocab_size=4096, context_length=4096, n_layers=2, d_model=256, d_ff=1024)
        return [
            (small, 16),
            (medium, 8),
            ({**long, "n_heads": 4, "n_kv_heads": 4}, 1),  # head dim 64
            ({**long, "n_heads": 2, "n_kv_heads": 2}, 1),  # head dim 128
        ]
    n_layers = 4 if sizes == "quick" else 12  # GPT-2 small shape; fewer layers keep --quick quick
    cfg = dict(vocab_size=50304, context_length=1024, n_layers=n_layers, n_heads=12, n_kv_heads=12, d_model=768)
    cfg["d_ff"] = 3072
    return [(cfg, 8)]


def generate_configs(device, sizes):
    """[(GPTConfig keyword arguments, batch, prompt tokens, new tokens)] for cached generation
    (``GPT.generate``) with grouped-query attention: a long prompt, then one token at a time."""
    if sizes == "tiny":
        cfg = dict(vocab_size=256, context_length=48, n_layers=1, n_heads=4, n_kv_heads=2, d_model=32, d_ff=128)
        return [(cfg, 1, 16, 8)]
    prompt, new = (1024, 64) if sizes == "quick" else (4096, 256)
    if device == "cpu":
        cfg = dict(vocab_size=4096, n_layers=2, n_heads=8, n_kv_heads=2, d_model=512, d_ff=2048)
    else:
        cfg = dict(vocab_size=50304, n_layers=12, n_heads=12, n_kv_heads=4, d_model=768, d_ff=3072)
    return [({**cfg, "context_length": prompt + new}, 1, prompt, new)]


class ModelImpl(NamedTuple):
    """One way to run the training step: the GPT built with ``backend``, compiled or not."""

    name: str
    kind: str  # "fastgpt" or "baseline"
    backend: str  # GPT(config, backend=...)
    compiled: bool


def model_impls(settings):
    """The training-step implementations: ``auto`` and the fallback against the baseline backend."""
    return [
        ModelImpl("fastgpt/auto", "fastgpt", "auto", False),
        ModelImpl(f"fastgpt/{registry.FALLBACK}", "fastgpt", registry.FALLBACK, False),
        ModelImpl("torch", "baseline", BASELINE_BACKEND, False),
        ModelImpl("torch.compile", "baseline", BASELINE_BACKEND, True),
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


def make_generate_step(cfg_kwargs, batch, prompt, new_tokens, backend, device, dtype):
    """``step(i)``: ``GPT.generate`` of ``new_tokens`` greedy tokens after a ``prompt``-token prompt."""
    from fastgpt.nn import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg_kwargs, dropout=0.0), backend=backend).to(device, dtype).eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompts = [torch.randint(0, cfg_kwargs["vocab_size"], (batch, prompt), generator=gen).to(device) for _ in range(2)]

    def step(i):
        model.generate(prompts[i % 2], new_tokens, temperature=0)

    return step


def profile_step(step, top=8):
    """Where one call of ``step`` spends its time: the ``top`` operators by self time (ms, calls)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step(0)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"name": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3), "calls": e.count} for e in events]


def _base_record(settings, pass_, shape, dtype, impl, tokens):
    return {
        "op": "model",
        "pass": pass_,
        "shape": shape,
        "dtype": DTYPE_NAMES[dtype],
        "device": settings.device,
        "implementation": impl.name,
        "kind": impl.kind,
        "status": "ok",
        "reason": None,
        "tokens": tokens,
    }


def _measure(settings, emit, pass_, shape, dtype, tokens, impls, make_step, memory=False):
    """Build every implementation's step, time them interleaved, emit one record each (with a
    profile of the auto and baseline steps: where the time went)."""
    records, steps = {}, {}
    for impl in impls:
        rec = records[impl.name] = _base_record(settings, pass_, shape, dtype, impl, tokens)
        if impl.compiled and settings.compile_skip_reason:
            rec.update(status="skipped", reason=settings.compile_skip_reason)
            continue
        try:
            steps[impl.name] = make_step(impl)
        except Exception as exc:
            rec.update(status="error" if impl.kind == "fastgpt" else "skipped", reason=f"{type(exc).__name__}: {first_line(exc)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timings = time_interleaved(steps, 2, settings)
            for impl in impls:
                if impl.name not in timings:
                    continue
                rec, timing = records[impl.name], timings[impl.name]
                rec.update(timing.__dict__)
                rec["tokens_per_s"] = tokens / (timing.median_ms / 1e3)
                if memory:
                    rec["peak_memory_bytes"], rec["peak_memory_kind"] = peak_training_memory(steps[impl.name], settings.device)
                if not impl.compiled and impl.backend in ("auto", BASELINE_BACKEND) and settings.sizes != "tiny":
                    rec["profile"] = profile_step(steps[impl.name])
    except Exception as exc:
        for name in steps:
            records[name].update(status="error", reason=f"{type(exc).__name__}: {first_line(exc)}")
    finally:
        steps.clear()  # frees the models and optimizer states before the next configuration
        if settings.device == "cuda":
            torch.cuda.empty_cache()
    for rec in records.values():
        emit(rec)


def run(settings, emit):
    """Training-step and generation tokens/s (and training peak memory) of fastgpt.nn.GPT for each
    backend, interleaved per configuration; ``emit(record)`` receives each result."""
    try:
        import fastgpt.nn  # noqa: F401
    except ImportError as exc:
        emit({"op": "model", "implementation": "all", "status": "skipped", "reason": f"fastgpt.nn missing: {exc}"})
        return
    dtype = (settings.dtypes or [torch.bfloat16 if settings.device == "cuda" else torch.float32])[0]
    impls = model_impls(settings)
    for cfg_kwargs, batch in model_configs(settings.device, settings.sizes):
        _measure(
            settings, emit, "train_step", {"batch": batch, **cfg_kwargs}, dtype, batch * cfg_kwargs["context_length"], impls,
            lambda impl: make_train_step(cfg_kwargs, batch, impl.backend, impl.compiled, settings.device, dtype),
            memory=True,
        )
    eager = [impl for impl in impls if not impl.compiled and impl.backend != registry.FALLBACK]
    for cfg_kwargs, batch, prompt, new in generate_configs(settings.device, settings.sizes):
        shape = {"batch": batch, "prompt": prompt, "new_tokens": new, **cfg_kwargs}
        _measure(
            settings, emit, "generate", shape, dtype, batch * new, eager,
            lambda impl: make_generate_step(cfg_kwargs, batch, prompt, new, impl.backend, settings.device, dtype),
        )
