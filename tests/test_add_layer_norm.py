"""fastgpt.ops.add_layer_norm / add_rms_norm: every backend against a float64 formula written here."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, assert_close, skip_unless_runs, skip_unless_supports

import fastgpt
from fastgpt import ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 17), (5, 768), (2, 3, 1000), (64, 4096)]


def add_norm_float64(x, residual, weight, bias, eps, rms):
    h = x.double() + residual.double()
    if rms:
        y = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    else:
        y = F.layer_norm(h, h.shape[-1:], eps=eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y, h


def make_input(shape, dtype, device, layout):
    """A random tensor; "strided" makes it a view whose rows are not adjacent in memory."""
    if layout == "contiguous":
        return torch.randn(shape, dtype=dtype, device=device)
    wide = torch.randn(*shape[:-1], shape[-1] + 5, dtype=dtype, device=device)
    return wide[..., 2 : shape[-1] + 2]


def run_and_check(backend, shape, dtype, device, layout, rms, affine, residual_dtype=None, use_dh=True):
    n = shape[-1]
    x = make_input(shape, dtype, device, layout).requires_grad_()
    residual = make_input(shape, residual_dtype or dtype, device, "contiguous").requires_grad_()
    weight = (torch.randn(n, dtype=dtype, device=device) if "weight" in affine else None)
    bias = (torch.randn(n, dtype=dtype, device=device) if "bias" in affine and not rms else None)
    skip_unless_supports("add_layer_norm", backend, x, residual, weight, bias)
    for p in (weight, bias):
        if p is not None:
            p.requires_grad_()
    norm = ops.add_rms_norm if rms else ops.add_layer_norm
    extra = {} if rms else {"bias": bias}
    keep_fp32 = residual_dtype == torch.float32
    y, h = norm(x, residual, weight, eps=1e-5, residual_in_fp32=keep_fp32, backend=backend, **extra)

    leaves = [t for t in (x, residual, weight, bias) if t is not None]
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    named = dict(zip(["x", "residual"] + (["weight"] if weight is not None else []) + (["bias"] if bias is not None else []), leaves64))
    y64, h64 = add_norm_float64(named["x"], named["residual"], named.get("weight"), named.get("bias"), 1e-5, rms)

    assert y.dtype == dtype and h.dtype == (residual_dtype or dtype)
    assert_close("y", y, y64, dtype)
    assert_close("h", h, h64, dtype)

    dy = torch.randn_like(y)
    dh = torch.randn_like(h) if use_dh else None
    outputs, grads = ([y, h], [dy, dh]) if use_dh else ([y], [dy])
    torch.autograd.backward(outputs, grads)
    grads64 = [g.cpu().double() for g in grads]
    torch.autograd.backward([y64, h64] if use_dh else [y64], grads64)
    for name, t, t64 in zip(named.keys(), leaves, leaves64):
        assert t.grad is not None, f"no gradient for {name}"
        assert_close(f"d{name}", t.grad, t64.grad, dtype, factor=2.0)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64(backend, shape, dtype, rms, device, poisoned_outputs):
    skip_unless_runs(backend, device, dtype)
    layout = "strided" if len(shape) == 3 or shape[-1] == 17 else "contiguous"
    run_and_check(backend, shape, dtype, device, layout, rms, affine=("weight", "bias"))


@pytest.mark.parametrize("affine", [(), ("weight",), ("bias",)], ids=["none", "weight", "bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_optional_weight_and_bias(backend, affine, device, poisoned_outputs):
    skip_unless_runs(backend, device)
    run_and_check(backend, (6, 130), torch.float32, device, "strided", rms=False, affine=affine)


@pytest.mark.parametrize("backend", BACKENDS)
def test_post_norm_without_gradient_into_h(backend, device, poisoned_outputs):
    skip_unless_runs(backend, device)
    run_and_check(backend, (7, 96), torch.float32, device, "contiguous", rms=False, affine=("weight", "bias"), use_dh=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_stream_in_float32(backend, device, poisoned_outputs):
    skip_unless_runs(backend, device, torch.float16)
    x = torch.randn(4, 200, dtype=torch.float16, device=device)
    residual = torch.randn(4, 200, dtype=torch.float32, device=device)
    weight = torch.randn(200, dtype=torch.float16, device=device)
    skip_unless_supports("add_layer_norm", backend, x, residual, weight, None)
    y, h = ops.add_layer_norm(x, residual, weight, residual_in_fp32=True, backend=backend)
    assert h.dtype == torch.float32 and y.dtype == torch.float16
    y64, h64 = add_norm_float64(x, residual, weight, None, 1e-5, rms=False)
    assert_close("h", h, h64, torch.float32)
    assert_close("y", y, y64, torch.float16)
    # an fp32 residual stream with half x, the pre-norm case, trains end to end
    run_and_check(backend, (3, 64), torch.float16, device, "contiguous", False, ("weight", "bias"), residual_dtype=torch.float32)


@pytest.mark.parametrize(
    "shape, dtype, residual_dtype",
    [((1100, 1023), torch.float32, None), ((2100, 1023), torch.float16, None), ((2100, 1023), torch.float16, torch.float32)],
    ids=["fp32", "fp16", "fp16-fp32-residual"],
)
def test_large_outputs(shape, dtype, residual_dtype, device, poisoned_outputs):
    """Outputs of 4 MiB and more: on the CPU they come from fastgpt's cache of huge-page
    buffers, and fp32 rows are computed in place in them; 1023 columns put most rows at
    unaligned addresses."""
    skip_unless_runs("native", device, dtype)
    run_and_check("native", shape, dtype, device, "contiguous", False, ("weight", "bias"), residual_dtype=residual_dtype)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_backward_accepts_reference_forward(backend, device):
    skip_unless_runs(backend, device)
    x, r = torch.randn(5, 33, device=device), torch.randn(5, 33, device=device)
    w, b = torch.randn(33, device=device), torch.randn(33, device=device)
    skip_unless_supports("add_layer_norm", backend, x, r, w, b)
    _, h, mean, rstd = torch.ops.fastgpt.add_layer_norm(x, r, w, b, 1e-5, False, False, "reference")
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    expected = torch.ops.fastgpt.add_layer_norm_backward(dy, dh, h, w, b, mean, rstd, False, "reference")
    got = torch.ops.fastgpt.add_layer_norm_backward(dy, dh, h, w, b, mean, rstd, False, backend)
    for name, g, e in zip(("dx", "dweight", "dbias"), got, expected):
        assert_close(name, g, e, torch.float32)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile_fullgraph(backend, rms, device):
    skip_unless_runs(backend, device)
    x, r = torch.randn(3, 40, device=device, requires_grad=True), torch.randn(3, 40, device=device, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    b = None if rms else torch.randn(40, device=device, requires_grad=True)
    skip_unless_supports("add_layer_norm", backend, x, r, w, b)
    torch.library.opcheck(torch.ops.fastgpt.add_layer_norm.default, (x, r, w, b, 1e-5, rms, False, backend))

    def loss(x, r, w):
        y, h = (ops.add_rms_norm(x, r, w, backend=backend) if rms else ops.add_layer_norm(x, r, w, b, backend=backend))
        return (y * h).sum()

    torch._dynamo.reset()  # every (backend, variant) is a recompile of the same code; stay under the limit
    compiled = torch.compile(loss, fullgraph=True, backend="eager")
    compiled(x, r, w).backward()
    expected = w.grad.clone()
    w.grad = None
    loss(x, r, w).backward()
    assert_close("dweight", expected, w.grad, torch.float32)


@pytest.mark.parametrize("residual_in_fp32", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_match_the_fake_kernel_for_a_transposed_x(backend, residual_in_fp32, device):
    """Outputs are contiguous whatever x's layout, as the op's fake kernel says (torch.compile and
    opcheck rely on it): a backend that kept x's transposed strides failed here."""
    skip_unless_runs(backend, device)
    dtype = torch.float16 if residual_in_fp32 else torch.float32
    x = torch.randn(8, 6, device=device, dtype=dtype).t()
    residual = torch.randn(8, 6, device=device, dtype=dtype).t()
    skip_unless_supports("add_layer_norm", backend, x, residual, None, None)
    torch.library.opcheck(
        torch.ops.fastgpt.add_layer_norm.default, (x, residual, None, None, 1e-5, False, residual_in_fp32, backend)
    )


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.add_layer_norm(x.numpy(), x)
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        ops.add_layer_norm(x, torch.randn(4, 9))
    with pytest.raises(TypeError, match="residual must have the dtype of x"):
        ops.add_layer_norm(x.half(), x.double())
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.add_layer_norm(x, x, torch.ones(9))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ops.add_layer_norm(x, x, None, torch.ones(4, 8))
    with pytest.raises(ValueError, match="eps must be a positive float"):
        ops.add_layer_norm(x, x, eps=0)
    with pytest.raises(TypeError, match="floating-point"):
        ops.add_rms_norm(x.int(), x.int())
    with pytest.raises(ValueError, match="non-empty last"):
        ops.add_layer_norm(torch.randn(4, 0), torch.randn(4, 0))
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.add_layer_norm(x, x, backend="apex")


def test_named_backend_that_cannot_run_raises():
    x = torch.randn(2, 8, dtype=torch.float64)
    for name in [n for n in fastgpt.backends() if n != "reference"]:
        with pytest.raises(fastgpt.BackendError, match=name):
            ops.add_layer_norm(x, x, backend=name)


def test_auto_falls_back_with_one_warning(fresh_warnings):
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="falls back to the reference backend") as record:
        ops.add_layer_norm(x, x)
        y, _ = ops.add_layer_norm(x, x)
    fallbacks = [w for w in record if "falls back" in str(w.message)]
    assert len(fallbacks) == 1
    assert fallbacks[0].filename == __file__  # names the caller's line, not torch's dispatch
    assert_close("y", y, add_norm_float64(x, x, None, None, 1e-5, rms=False)[0], torch.float32)


def test_named_reference_gives_no_warning():
    x = torch.randn(2, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.add_layer_norm(x, x, backend="reference")
