"""The attention op: its sweep, fastgpt's backends and the baselines (eager, torch.compile, SDPA
and each SDPA backend, flash_attn when installed).

FLOPs ``4·b·h·sq·sk·d``, halved when causal; forward+backward 3.5× the forward.
"""

import torch
import torch.nn.functional as F

from fastgpt import ops
from fastgpt.bench.cases import PASSES, Case
from fastgpt.bench.implementations import Impl, compiled_baseline, fastgpt_impls
from fastgpt.bench.running import run_cases
from fastgpt.bench.settings import default_dtypes

SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


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


def attention_cases(settings, sizes=None):
    """The cases of ``sizes`` ([(batch, heads, seq, head_dim, causal)]; default: the sweep's)."""
    for dtype in settings.dtypes or default_dtypes("attention", settings.device):
        for b, h, s, d, causal in sizes or attention_sizes(settings.device, settings.sizes):
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


def eager_attention(q, k, v, causal):
    """The textbook attention a user writes: scores, causal mask, softmax, weighted sum.

    The same formula as ``fastgpt.reference.attention_forward``, written a second time on purpose:
    the baseline is what a user writes in eager torch — computed in the input dtype, no
    log-sum-exp, differentiated by autograd. The reference computes in fp32 and returns the lse
    for its own backward; it is timed too, as ``fastgpt/reference``.
    """
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


def _flash_attn_impl():
    try:
        from flash_attn import flash_attn_func
    except ImportError as exc:
        return Impl("flash_attn", "baseline", skip_reason=f"not installed ({exc})")

    # flash_attn wants (b, s, h, d): a transposed view costs nothing and keeps the inputs shared
    def run(q, k, v, causal):
        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return o.transpose(1, 2)

    return Impl("flash_attn", "baseline", run=run)


def attention_impls(settings):
    """Every implementation of causal attention this machine can time, fastgpt's first."""

    def fastgpt_attention(backend):
        return lambda q, k, v, causal: ops.attention(q, k, v, causal=causal, backend=backend)

    impls = fastgpt_impls(fastgpt_attention, settings.device)
    impls.append(Impl("torch eager", "baseline", run=eager_attention))
    impls.append(compiled_baseline(eager_attention, settings))
    impls.append(Impl("sdpa", "baseline", run=lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c)))
    try:
        impls.extend(_sdpa_impl(name) for name in SDPA_BACKENDS)
    except ImportError as exc:  # torch < 2.3 has no torch.nn.attention.sdpa_kernel
        impls.append(Impl("sdpa/<backends>", "baseline", skip_reason=f"torch.nn.attention.sdpa_kernel missing: {exc}"))
    impls.append(_flash_attn_impl())
    return impls


def run(settings, emit):
    """Time every attention implementation on every case of the sweep; ``emit(record)`` each result."""
    run_cases(attention_cases(settings), attention_impls(settings), settings, emit)
