"""The model op: one AdamW training step of ``fastgpt.nn.GPT`` (forward, loss, backward, update),
its tokens/s and peak memory, on fastgpt's backends against the same model on torch's kernels
(``GPT(config, backend="torch")``) and torch.compile of it."""

import warnings
from typing import NamedTuple

import torch

from fastgpt import registry
from fastgpt.bench.implementations import BASELINE_BACKEND
from fastgpt.bench.records import first_line
from fastgpt.bench.settings import DTYPE_NAMES
from fastgpt.bench.timing import time_calls


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


def run(settings, emit):
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
                reason = f"{type(exc).__name__}: {first_line(exc)}"
                rec.update(status="error" if kind == "fastgpt" else "skipped", reason=reason)
            finally:
                step = None  # frees the model and optimizer state before the next one
                if settings.device == "cuda":
                    torch.cuda.empty_cache()
            emit(rec)
