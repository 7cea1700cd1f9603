"""An implementation: one way to compute an op, fastgpt's (one per registered backend) or a
baseline a user would pick instead."""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastgpt import registry
from fastgpt.bench.machine import backend_report

# The registered backend whose kernels are torch's own (SDPA, F.layer_norm). The bench times
# torch's kernels as the baselines — eager, torch.compile, SDPA and each of its backends, and the
# GPT built with backend=BASELINE_BACKEND — so this backend is the yardstick, not one of fastgpt's.
BASELINE_BACKEND = "torch"


@dataclass
class Impl:
    """One way to compute an op: ``run(*inputs) -> output`` (differentiable), or why it cannot."""

    name: str
    kind: str  # "fastgpt" or "baseline"
    run: Optional[Callable] = None
    skip_reason: Optional[str] = None


def fastgpt_backends():
    """The registered backends timed as fastgpt's implementations: all but the baseline."""
    return [name for name in registry.names() if name != BASELINE_BACKEND]


def fastgpt_impls(op_fn, device):
    """One ``Impl`` per fastgpt backend, ``op_fn(backend)`` computing the op on it; an unavailable
    backend, and Triton's CPU interpreter, come with the reason they are not timed."""
    report = backend_report()
    impls = []
    for name in fastgpt_backends():
        impl_name, info = f"fastgpt/{name}", report[name]
        if not info["available"]:
            impls.append(Impl(impl_name, "fastgpt", skip_reason=f"unavailable: {info['reason']}"))
        elif name == "triton" and device == "cpu":
            reason = "Triton on the CPU is its interpreter: not benchmarked"
            impls.append(Impl(impl_name, "fastgpt", skip_reason=reason))
        else:
            impls.append(Impl(impl_name, "fastgpt", run=op_fn(name)))
    return impls


def compiled_baseline(fn, settings):
    """The ``torch.compile`` baseline of the eager expression ``fn``, unless the run leaves it out."""
    if settings.compile_skip_reason:
        return Impl("torch.compile", "baseline", skip_reason=settings.compile_skip_reason)
    return Impl("torch.compile", "baseline", run=torch.compile(fn))
