"""Shared test set-up: Triton's CPU interpreter when there is no GPU, a wrapper backend registered
beside the built-in ones (so every shared suite runs on it too), devices, poisoned outputs, and the
same random draws in every run."""

import os
import random

import torch

# Triton reads this when it is imported, so it must be set before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import wrapper_backend  # noqa: E402

import fastgpt  # noqa: E402
from fastgpt import dispatch, registry  # noqa: E402

registry.register_backend(
    registry.Backend(
        wrapper_backend.NAME,
        {"attention": "wrapper_backend", "add_layer_norm": "wrapper_backend"},
        lambda: (True, "the tests' wrapper around the reference"),
    ),
    replace=True,
)
BACKENDS = list(registry.names())  # what the shared suites run on: every registered backend

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOLERANCE = {  # relative error against float64 that an implementation with fp32 accumulation meets
    torch.float32: 2e-5,
    torch.float16: 3e-3,
    torch.bfloat16: 2e-2,
}


def relative_error(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64; NaN or inf anywhere gives inf, so it never passes."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    scale = ref.norm().item()
    return (out - ref).norm().item() / (scale if scale > 0 else 1.0)


def assert_close(name, out, ref, dtype, factor=1.0):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = relative_error(out, ref)
    tol = TOLERANCE[dtype] * factor
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


def skip_unless_runs(backend, device, dtype=None):
    """Skip (saying why) when ``backend`` cannot run on ``device``/``dtype`` in this environment."""
    info = fastgpt.backends()[backend]
    if not info["available"]:
        pytest.skip(f"{backend} backend unavailable: {info['reason']}")
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is unreliable in Triton's CPU interpreter; bf16 is tested on CUDA")


def skip_unless_supports(op, backend, *args):
    """Skip (saying why) when ``backend`` declines these inputs: e.g. the CUDA build of the native
    attention takes half precision only, and Triton runs CPU tensors only in its interpreter."""
    reason = dispatch.unsupported_reason(op, backend, args)
    if reason is not None:
        pytest.skip(f"{backend} backend does not run these inputs: {reason}")


@pytest.fixture(autouse=True)
def same_random_draws():
    """Each test draws the same inputs on every run: a tolerance miss reproduces, and a rare draw
    (an fp32 gradient that is a difference of nearly equal terms) cannot fail one CI run in many."""
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Fill every freshly allocated floating-point tensor with NaN, so an element a kernel forgets
    to write fails the comparison: torch.empty* for Python backends, the extension's hook for native."""
    for name in ("empty", "empty_like", "empty_strided"):
        original = getattr(torch, name)

        def poisoned(*args, _original=original, **kwargs):
            t = _original(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            return t

        monkeypatch.setattr(torch, name, poisoned)
    native = _native_extension()
    if native is not None:
        native._set_poison_outputs(True)
    yield
    if native is not None:
        native._set_poison_outputs(False)


def _native_extension():
    try:
        from fastgpt import _C
    except ImportError:
        return None
    return _C


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which fallback warnings were already given, so a test sees its own."""
    monkeypatch.setattr(dispatch, "_warned", set())
