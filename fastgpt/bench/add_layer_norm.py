"""The add+LayerNorm op: its sweep, fastgpt's backends and the baselines (eager ``x + r`` then
``F.layer_norm``, and torch.compile of that).

Bytes: the forward reads x, residual, weight, bias and writes y, h; the backward reads dy, h,
weight, mean, rstd and writes dx, dweight, dbias.
"""

import torch
import torch.nn.functional as F

from fastgpt import ops
from fastgpt.bench.cases import PASSES, Case
from fastgpt.bench.implementations import Impl, compiled_baseline, fastgpt_impls
from fastgpt.bench.running import run_cases
from fastgpt.bench.settings import default_dtypes


def add_layer_norm_sizes(device, sizes):
    """[(rows, hidden)] to sweep."""
    if sizes == "tiny":
        return [(64, 128)]
    if device == "cpu":
        return [(2048, 1024)] if sizes == "quick" else [(8192, n) for n in (256, 512, 1024, 2048, 4096)]
    if sizes == "quick":
        return [(8192, 1024), (8192, 4096)]
    return [(rows, n) for rows in (4096, 16384) for n in (768, 1024, 2048, 4096, 8192, 12288, 16384)]


def add_layer_norm_cases(settings, sizes=None):
    """The cases of ``sizes`` ([(rows, hidden)]; default: the sweep's)."""
    for dtype in settings.dtypes or default_dtypes("add_layer_norm", settings.device):
        es = torch.tensor([], dtype=dtype).element_size()
        for rows, n in sizes or add_layer_norm_sizes(settings.device, settings.sizes):

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


def eager_add_layer_norm(x, residual, weight, bias):
    """What a user writes without fastgpt: the residual add, then F.layer_norm."""
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, 1e-5)


def add_layer_norm_impls(settings):
    def fastgpt_add_layer_norm(backend):
        return lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, 1e-5, backend=backend)[0]

    impls = fastgpt_impls(fastgpt_add_layer_norm, settings.device)
    impls.append(Impl("torch eager", "baseline", run=eager_add_layer_norm))
    impls.append(compiled_baseline(eager_add_layer_norm, settings))
    return impls


def run(settings, emit):
    """Time every add+LayerNorm implementation on every case of the sweep; ``emit(record)`` each result."""
    run_cases(add_layer_norm_cases(settings), add_layer_norm_impls(settings), settings, emit)
