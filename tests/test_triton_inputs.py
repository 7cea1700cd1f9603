"""Inputs the Triton kernels must take or decline honestly: weight and bias of any stride
(a slice, an expanded stride-0 vector), dtypes they cannot compute where they run, and the edges
of the attention variants (decoding under a window or a soft cap, a negative or zero scale under a
soft cap, packed batches without keys or queries)."""

import pytest
import torch
from attention_oracle import attention_float64
from conftest import assert_close

import fastgpt
from fastgpt import ops

pytest.importorskip("triton")


def _skip_unless_triton():
    info = fastgpt.backends()["triton"]
    if not info["available"]:
        pytest.skip(f"triton backend unavailable: {info['reason']}")


def _parameter(kind, n, generator):
    """A (n,) vector laid out as ``kind``: contiguous, every other element of a longer one, or one value expanded."""
    if kind == "contiguous":
        return torch.randn(n, generator=generator)
    if kind == "sliced":
        return torch.randn(2 * n, generator=generator)[::2]
    return torch.randn(1, generator=generator).expand(n)  # stride 0


def _add_norm_float64(x, residual, weight, bias, eps, rms):
    h = x.double() + residual.double()
    if rms:
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    else:
        y = torch.nn.functional.layer_norm(h, h.shape[-1:], eps=eps)
    return y * weight.double() + (bias.double() if bias is not None else 0.0)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("layout", ["sliced", "expanded"])
@pytest.mark.parametrize("n", [16, 130])
def test_add_norm_honours_weight_and_bias_strides(layout, n, rms):
    _skip_unless_triton()
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=generator, requires_grad=True)
    residual = torch.randn(5, n, generator=generator, requires_grad=True)
    weight = _parameter(layout, n, generator).requires_grad_()
    bias = None if rms else _parameter(layout, n, generator).requires_grad_()
    op = ops.add_rms_norm if rms else ops.add_layer_norm
    args = (x, residual, weight) if rms else (x, residual, weight, bias)
    y, _ = op(*args, eps=1e-5, backend="triton")
    y_ref = _add_norm_float64(x, residual, weight, bias, 1e-5, rms)
    assert_close("y", y, y_ref, torch.float32)

    leaves = [t for t in (x, weight, bias) if t is not None]
    dy = torch.randn(5, n, generator=generator)
    grads = torch.autograd.grad(y, leaves, dy)
    grads_ref = torch.autograd.grad(y_ref, leaves, dy.double())
    for name, grad, grad_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        assert_close(name, grad, grad_ref, torch.float32)


def test_bf16_attention_is_declined_under_the_interpreter():
    """The interpreter's bf16 tl.dot is wrong by orders of magnitude: the backend must say so
    rather than return it."""
    kernels = pytest.importorskip("fastgpt.kernels.attention")
    if not kernels.interpreting():
        pytest.skip("only the CPU interpreter computes bf16 dot products wrongly")
    q = torch.randn(1, 2, 16, 32, dtype=torch.bfloat16)
    reason = kernels.attention_unsupported(q, q, q)
    assert reason is not None and "bfloat16" in reason and "interpreter" in reason
    assert kernels.attention_unsupported(q.half(), q.half(), q.half()) is None


def test_bf16_add_norm_is_right_under_the_interpreter():
    """The add+LayerNorm kernels have no dot product: bf16 is computed correctly wherever they run,
    so the backend keeps accepting it."""
    _skip_unless_triton()
    generator = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(7, 130, generator=generator).bfloat16().requires_grad_() for _ in range(2))
    weight, bias = (torch.randn(130, generator=generator).bfloat16().requires_grad_() for _ in range(2))
    y, _ = ops.add_layer_norm(x, residual, weight, bias, backend="triton")
    y_ref = _add_norm_float64(x, residual, weight, bias, 1e-5, rms=False)
    assert_close("y", y, y_ref, torch.bfloat16)
    dy = torch.randn(7, 130, generator=generator)
    grads = torch.autograd.grad(y, (x, weight, bias), dy.bfloat16())
    grads_ref = torch.autograd.grad(y_ref, (x, weight, bias), dy.double())
    for name, grad, grad_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        assert_close(name, grad, grad_ref, torch.bfloat16)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
@pytest.mark.parametrize("seq_q, seq_k", [(1, 77), (33, 65), (65, 33)], ids=["decode", "forward", "rows-see-none"])
def test_attention_takes_a_negative_or_zero_scale(scale, seq_q, seq_k):
    """The forward kernels scale a tile's row max rather than every score (the scale folds into exp2),
    which needs scale >= 0: a negative scale is applied by negating q, and 0 weighs keys equally."""
    _skip_unless_triton()
    kernels = pytest.importorskip("fastgpt.kernels.attention")
    generator = torch.Generator().manual_seed(seq_q)
    q = torch.randn(1, 4, seq_q, 40, generator=generator)
    k, v = (torch.randn(1, 2, seq_k, 40, generator=generator) for _ in range(2))
    o, lse = kernels.attention_forward(q, k, v, True, scale)
    o_ref, lse_ref = attention_float64(q, k, v, True, scale)
    assert_close("o", o, o_ref, torch.float32)
    seen = torch.isfinite(lse_ref)
    assert_close("lse", lse[seen], lse_ref[seen], torch.float32)
    assert (lse[~seen] == float("-inf")).all()


@pytest.mark.parametrize("causal, window, softcap", [(True, (20, 0), 0.0), (True, (7, 0), 2.0), (True, None, 1.5),
                                                     (False, (150, 3), 0.0)])
def test_decode_with_a_window_or_a_cap(causal, window, softcap):
    """Decoding against a long cache: the keys before the window are dropped (the rest is split
    across programs as usual, with a soft cap across several splits), the mask stays aligned to
    the last key."""
    _skip_unless_triton()
    kernels = pytest.importorskip("fastgpt.kernels.attention")
    from fastgpt.kernels.attention_decode import decode_plan

    generator = torch.Generator().manual_seed(len(str(window)))
    q = torch.randn(1, 4, 2, 16, generator=generator)
    k, v = (torch.randn(1, 2, 200, 16, generator=generator) for _ in range(2))
    assert decode_plan(1, 2, 2, 2, 200, 16, q).splits > 1
    o, lse = kernels.attention_forward(q, k, v, causal, 0.3, window=window, softcap=softcap)
    o_ref, lse_ref = attention_float64(q, k, v, causal, 0.3, window, softcap)
    assert_close("o", o, o_ref, torch.float32)
    assert_close("lse", lse, lse_ref, torch.float32)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_variants_take_a_negative_or_zero_scale(scale):
    """The sign of the scale moves into q under a window and a soft cap too (tanh is odd)."""
    _skip_unless_triton()
    kernels = pytest.importorskip("fastgpt.kernels.attention")
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 21, 16, generator=generator)
    k, v = (torch.randn(1, 1, 37, 16, generator=generator) for _ in range(2))
    o, lse = kernels.attention_forward(q, k, v, False, scale, window=(9, 4), softcap=2.0)
    o_ref, lse_ref = attention_float64(q, k, v, False, scale, (9, 4), 2.0)
    assert_close("o", o, o_ref, torch.float32)
    assert_close("lse", lse, lse_ref, torch.float32)


def test_packed_sequences_without_keys_or_queries():
    """Varlen batches where no sequence has a key (zeros, lse -inf, zero gradients) or no query."""
    _skip_unless_triton()
    kernels = pytest.importorskip("fastgpt.kernels.attention")
    q = torch.randn(5, 2, 16)
    k = v = torch.randn(0, 1, 16)
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    o, lse = kernels.varlen_attention_forward(q, k, v, cu_q, cu_k, 3, 0, True, 0.25)
    assert (o == 0).all() and (lse == float("-inf")).all() and lse.shape == (2, 5)
    dq, dk, dv = kernels.varlen_attention_backward(torch.randn_like(o), q, k, v, o, lse, cu_q, cu_k, 3, 0, True, 0.25)
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape
    q0 = torch.randn(0, 2, 16)
    k0, v0 = (torch.randn(4, 1, 16) for _ in range(2))
    o, lse = kernels.varlen_attention_forward(q0, k0, v0, torch.zeros(2, dtype=torch.int32),
                                              torch.tensor([0, 4], dtype=torch.int32), 0, 4, False, 0.25)
    assert o.shape == (0, 2, 16) and lse.shape == (2, 0)
    dq, dk, dv = kernels.varlen_attention_backward(o, q0, k0, v0, o, lse, torch.zeros(2, dtype=torch.int32),
                                                   torch.tensor([0, 4], dtype=torch.int32), 0, 4, False, 0.25)
    assert (dk == 0).all() and (dv == 0).all()
