"""The native backend's autograd registered in C++ (csrc/autograd.cpp): fastgpt.ops takes it on the
eager path with grad instead of its Python autograd.Function. Its forward and backward must be the
native ops' own, so it is checked against them bit for bit: the outputs equal the forward op's and
the gradients what the backward op returns for the same upstream gradients (the shared suites check
the native backend against float64 through this path)."""

import pytest
import torch

import fastgpt
from fastgpt import native, ops

pytestmark = pytest.mark.skipif(not native.available()[0], reason=f"native extension: {native.available()[1]}")


def attention_inputs(dtype=torch.float32, strided=False):
    q = torch.randn(2, 4, 9, 16, dtype=dtype)
    k = torch.randn(2, 2, 11, 16, dtype=dtype)
    v = torch.randn(2, 2, 11, 16, dtype=dtype)
    if strided:  # (b, s, h, d) storage seen as (b, h, s, d), as the model's projections are
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return [t.requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_attention_gradients_are_the_native_ops(dtype, causal, strided):
    q, k, v = attention_inputs(dtype, strided)
    o = torch.ops.fastgpt.native_attention(q, k, v, causal, 0.3)
    o_ref, lse = torch.ops.fastgpt.native_attention_forward(q, k, v, causal, 0.3)
    assert torch.equal(o, o_ref)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    expected = torch.ops.fastgpt.native_attention_backward(do, q, k, v, o_ref, lse, causal, 0.3)
    for got, want in zip(grads, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("use_h", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32, False), (torch.bfloat16, torch.float32, True)],
                         ids=["fp32", "bf16-x-fp32-residual"])
def test_add_layer_norm_gradients_are_the_native_ops(rms, use_h, dtypes):
    x_dtype, residual_dtype, residual_in_fp32 = dtypes
    x = torch.randn(3, 5, 40, dtype=x_dtype, requires_grad=True)
    r = torch.randn(3, 5, 40, dtype=residual_dtype, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    b = None if rms else torch.randn(40, requires_grad=True)
    y, h = torch.ops.fastgpt.native_add_layer_norm(x, r, w, b, 1e-5, rms, residual_in_fp32)
    y_ref, h_ref, mean, rstd = torch.ops.fastgpt.native_add_layer_norm_forward(x, r, w, b, 1e-5, rms, residual_in_fp32)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
    dy = torch.randn_like(y)
    dh = torch.randn_like(h) if use_h else None
    inputs = [t for t in (x, r, w, b) if t is not None]
    loss = (y * dy).sum() + ((h * dh).sum() if use_h else 0)
    grads = torch.autograd.grad(loss, inputs)
    dx, dw, db = torch.ops.fastgpt.native_add_layer_norm_backward(dy, dh, h_ref, w, b, mean, rstd, rms)
    assert grads[0].dtype == x_dtype and grads[1].dtype == residual_dtype
    assert torch.equal(grads[0], dx.to(x_dtype)) and torch.equal(grads[1], dx.to(residual_dtype))
    assert torch.equal(grads[2], dw)
    if not rms:
        assert torch.equal(grads[3], db)


def test_only_h_used_gets_a_zero_dy():
    x, r = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    _, h = torch.ops.fastgpt.native_add_layer_norm(x, r, None, None, 1e-5, False, False)
    dx, dr = torch.autograd.grad(h.sum(), (x, r))
    assert torch.equal(dx, torch.ones_like(x)) and torch.equal(dr, torch.ones_like(r))


def test_opcheck():
    q, k, v = attention_inputs()
    torch.library.opcheck(torch.ops.fastgpt.native_attention.default, (q, k, v, True, 0.25))
    x, r = torch.randn(3, 40, requires_grad=True), torch.randn(3, 40, requires_grad=True)
    w, b = torch.randn(40, requires_grad=True), torch.randn(40, requires_grad=True)
    torch.library.opcheck(torch.ops.fastgpt.native_add_layer_norm.default, (x, r, w, b, 1e-5, False, False))


def test_inference_tensors_take_the_plain_forward():
    with torch.inference_mode():
        q, k, v = (t.detach() for t in attention_inputs())
        o = torch.ops.fastgpt.native_attention(q, k, v, True, 0.25)
        assert torch.equal(o, torch.ops.fastgpt.native_attention_forward(q, k, v, True, 0.25)[0])
        x, r = torch.randn(3, 40), torch.randn(3, 40)
        y, _ = torch.ops.fastgpt.native_add_layer_norm(x, r, None, None, 1e-5, False, False)
        assert torch.equal(y, torch.ops.fastgpt.native_add_layer_norm_forward(x, r, None, None, 1e-5, False, False)[0])


def test_the_eager_ops_take_the_cpp_autograd():
    """A call with grad on the native backend builds the C++ node, not fastgpt.ops' Python
    autograd.Function (whose node is named after it): the cheaper path is the one that runs."""
    q, k, v = attention_inputs()
    o = ops.attention(q, k, v, backend="native")
    assert o.grad_fn.name().endswith("fastgpt::(anonymous namespace)::AttentionFunction>")
    x, r = torch.randn(3, 40, requires_grad=True), torch.randn(3, 40)
    y, _ = ops.add_layer_norm(x, r, backend="native")
    assert y.grad_fn.name().endswith("fastgpt::(anonymous namespace)::AddLayerNormFunction>")
    # the variants are wired by fastgpt.ops (the C++ node covers the plain op only)
    if "window" in fastgpt.registry.get("native").variants:
        o = ops.attention(q, k, v, window=(3, 0), backend="native")
        assert isinstance(o.grad_fn, torch.autograd.function.BackwardCFunction)


@pytest.mark.parametrize("backend_call", ["attention", "attention-window", "add_layer_norm"])
def test_differentiating_the_backward_raises_instead_of_zeros(backend_call):
    """The native kernels have no second derivative: a backward through their backward (create_graph,
    then grad again) raises, on the C++ node and on fastgpt.ops' Python path alike, instead of torch's
    default for an op without autograd (a warning and silently zero gradients)."""
    q, k, v = attention_inputs()
    if backend_call == "add_layer_norm":
        x = torch.randn(3, 40, requires_grad=True)
        out, first = ops.add_layer_norm(x, torch.randn(3, 40), backend="native")[0], x
    else:
        window = (3, 0) if backend_call == "attention-window" else None
        out, first = ops.attention(q, k, v, window=window, backend="native"), q
    (grad,) = torch.autograd.grad((out**2).sum(), first, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for fastgpt::native_.*backward is not implemented"):
        torch.autograd.grad(grad.sum(), first)
