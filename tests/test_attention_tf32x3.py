"""fp32 Triton attention's "tf32x3" products are accurate enough for the float64 tests' fp32 tolerances.

On a GPU, fp32 ``tl.dot`` runs as "tf32x3" (``attention_configs.dot_precision``): Triton splits each
operand ``a`` into ``hi`` = ``a`` rounded to tf32 (10 explicit mantissa bits, ``cvt.rna``: to
nearest, ties away from zero) and ``lo = a - hi``, and sums three tensor-core products
``lo·hi + hi·lo + hi·hi`` in fp32. Triton's interpreter ignores the precision (``np.matmul`` in
fp32), so the interpreter tests in test_attention.py cannot see that rounding. This file emulates
it on the CPU: a reference attention whose every product (QKᵀ, PV and the backward's dO·Vᵀ, PᵀdO,
dS·K, dSᵀQ) goes through the tf32x3 split, checked against the float64 oracle at the tolerances
the float64 tests use for fp32 (``TOLERANCE[float32]``, twice it for gradients). ``lo`` is fed to
the tensor core unrounded and the hardware reads only its tf32 bits, so the emulation is run with
``lo`` rounded to nearest and truncated. Plain tf32 products (one product of rounded operands) are
shown to miss the same tolerances, so the check can fail.

What only a GPU can show: the kernels' own rounding (tensor-core accumulation order and its
internal precision, the fp32 softmax as compiled); the emulation bounds the products' error, the
GPU run of test_attention.py checks the kernels themselves.
"""

import math

import pytest
import torch
from attention_oracle import attention_float64, visible_keys
from conftest import TOLERANCE, relative_error

TF32_DROPPED_BITS = 13  # fp32 has 23 explicit mantissa bits, tf32 10


def round_to_tf32(x):
    """``x`` (fp32) rounded to tf32 to nearest, ties away from zero (PTX ``cvt.rna.tf32.f32``)."""
    bits = x.view(torch.int32)
    half = 1 << (TF32_DROPPED_BITS - 1)
    return ((bits + half) & -(1 << TF32_DROPPED_BITS)).view(torch.float32)


def truncate_to_tf32(x):
    """``x`` (fp32) with its low 13 mantissa bits dropped: how a tensor core reads a non-tf32 value."""
    return (x.view(torch.int32) & -(1 << TF32_DROPPED_BITS)).view(torch.float32)


def tf32_matmul(a, b):
    """One tensor-core product of fp32 operands at "tf32" precision: operands rounded, fp32 sums."""
    return round_to_tf32(a) @ round_to_tf32(b)


def tf32x3_matmul(lo_to_tf32):
    """The "tf32x3" product: hi = a rounded to tf32, lo = a - hi as the tensor core reads it
    (``lo_to_tf32``); lo·hi + hi·lo + hi·hi summed in fp32 (each product of tf32 values is exact)."""

    def matmul(a, b):
        a_hi, b_hi = round_to_tf32(a), round_to_tf32(b)
        a_lo, b_lo = lo_to_tf32(a - a_hi), lo_to_tf32(b - b_hi)
        return a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi

    return matmul


def attention_fp32(q, k, v, do, causal, scale, matmul):
    """Forward (o, lse) and gradients (dq, dk, dv) in fp32 as the Triton kernels compute them, every
    product through ``matmul``: scores, softmax with its log-sum-exp, then the backward from
    P = exp(S - lse) and delta = rowsum(dO·O)."""
    visible = visible_keys(q.shape[2], k.shape[2], causal, None)
    scores = torch.where(visible, matmul(q, k.transpose(-1, -2)) * scale, -math.inf)
    lse = torch.logsumexp(scores, -1, keepdim=True)
    probs = torch.where(visible, torch.exp(scores - lse), 0.0)
    o = matmul(probs, v)
    delta = (do * o).sum(-1, keepdim=True)
    dv = matmul(probs.transpose(-1, -2), do)
    dscores = probs * (matmul(do, v.transpose(-1, -2)) - delta) * scale
    dq = matmul(dscores, k)
    dk = matmul(dscores.transpose(-1, -2), q)
    return o, lse.squeeze(-1), (dq, dk, dv)


# (batch, heads, seq_q, seq_k, head_dim, causal): head dims 16..128, both masks, more keys than queries
SHAPES = [(2, 2, 17, 17, 16, False), (1, 2, 64, 64, 64, True), (1, 2, 33, 65, 128, True), (1, 1, 48, 96, 128, False)]


def _errors(shape, matmul):
    """Relative errors of ``attention_fp32`` with ``matmul`` against the float64 oracle, by output."""
    batch, heads, seq_q, seq_k, head_dim, causal = shape
    generator = torch.Generator().manual_seed(seq_q * 1000 + head_dim)
    q = torch.randn(batch, heads, seq_q, head_dim, generator=generator)
    k, v = (torch.randn(batch, heads, seq_k, head_dim, generator=generator) for _ in range(2))
    do = torch.randn(batch, heads, seq_q, head_dim, generator=generator)
    scale = 1.0 / math.sqrt(head_dim)

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, lse64 = attention_float64(q64, k64, v64, causal, scale)
    o64.backward(do.double())
    o, lse, grads = attention_fp32(q, k, v, do, causal, scale, matmul)
    errors = {"o": relative_error(o, o64), "lse": relative_error(lse, lse64)}
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, (q64, k64, v64)):
        errors[name] = relative_error(grad, ref.grad)
    return errors


# what test_attention.py allows fp32: the forward at TOLERANCE, the gradients at twice it
ALLOWED = {name: TOLERANCE[torch.float32] * (2.0 if name.startswith("d") else 1.0)
           for name in ("o", "lse", "dq", "dk", "dv")}


@pytest.mark.parametrize("lo_to_tf32", [round_to_tf32, truncate_to_tf32], ids=["lo_rounded", "lo_truncated"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "q{}k{}d{}{}".format(*s[2:5], "c" if s[5] else ""))
def test_tf32x3_products_meet_the_fp32_tolerances(shape, lo_to_tf32):
    errors = _errors(shape, tf32x3_matmul(lo_to_tf32))
    over = {name: f"{err:.3g} > {ALLOWED[name]:.3g}" for name, err in errors.items() if err > ALLOWED[name]}
    assert not over, over


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "q{}k{}d{}{}".format(*s[2:5], "c" if s[5] else ""))
def test_plain_tf32_products_would_miss_them(shape):
    """One tf32 product per dot (Triton's default for fp32) misses the output's and every
    gradient's tolerance: the emulation tells the two precisions apart."""
    errors = _errors(shape, tf32_matmul)
    within = {name: f"{err:.3g} <= {ALLOWED[name]:.3g}" for name, err in errors.items()
              if name != "lse" and err <= ALLOWED[name]}
    assert not within, within


def test_tf32_rounding_keeps_ten_mantissa_bits():
    x = torch.tensor([1 + 2**-10, 1 + 2**-11, 1 + 3 * 2**-12, -(1 + 2**-11), 1 + 2**-11 - 2**-23])
    assert round_to_tf32(x).tolist() == [1 + 2**-10, 1 + 2**-10, 1 + 2**-10, -(1 + 2**-10), 1.0]
    assert truncate_to_tf32(x).tolist() == [1 + 2**-10, 1.0, 1.0, -1.0, 1.0]
