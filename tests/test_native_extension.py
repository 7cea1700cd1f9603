"""The C++ extension fastgpt._C itself: loading, build info, the poison hook, op schemas, bad inputs.

Numerics of the native backend against float64 live in the shared, backend-parametrized
tests (test_attention.py, test_add_layer_norm.py).
"""

import importlib

import pytest
import torch

from fastgpt import native

requires_extension = pytest.mark.skipif(
    not native.available()[0], reason=f"native extension: {native.available()[1]}"
)


@pytest.fixture
def extension():
    from fastgpt import _C

    return _C


def small_attention_inputs(dtype=torch.float32, causal=True):
    q = torch.randn(1, 4, 9, 16, dtype=dtype)
    k = torch.randn(1, 2, 11, 16, dtype=dtype)
    v = torch.randn(1, 2, 11, 16, dtype=dtype)
    return q, k, v, causal, 0.25


def small_norm_inputs(rms=False):
    x, r = torch.randn(3, 5, 40), torch.randn(3, 5, 40)
    w = torch.randn(40)
    b = None if rms else torch.randn(40)
    return x, r, w, b, 1e-5, rms, False


@requires_extension
def test_build_info_keys_and_types(extension):
    info = extension.build_info()
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list) and all(isinstance(a, str) for a in info["cuda_archs"])
    assert info["cuda"] == bool(info["cuda_archs"])
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["threads"], int) and info["threads"] >= 1
    assert info["torch"] == torch.__version__.split("+")[0]
    assert isinstance(info["compiler"], str) and info["compiler"]
    assert info["cpu_gemm"] in ("blas", "aten")
    assert isinstance(info["cpu_bf16_gemm"], bool)
    assert isinstance(info["cpu_bf16_dot"], bool)
    assert isinstance(info["cuda_attention_backward"], bool)
    assert isinstance(info["cxx11_abi"], bool) and info["cxx11_abi"] == torch._C._GLIBCXX_USE_CXX11_ABI
    assert isinstance(info["cpu_attention_max_head_dim"], int) and info["cpu_attention_max_head_dim"] >= 128
    if not info["cuda"]:
        assert not info["cuda_attention_forward"] and not info["cuda_attention_backward"]
        assert info["cuda_attention_dtypes"] == info["cuda_attention_head_dims"] == []
        assert info["cuda_add_layer_norm_max_hidden"] == 0
    else:
        assert set(info["cuda_attention_dtypes"]) <= {"float32", "float16", "bfloat16"}
        assert info["cuda_attention_dtypes"] and all(isinstance(d, int) for d in info["cuda_attention_head_dims"])
        assert info["cuda_add_layer_norm_max_hidden"] >= 1024


@requires_extension
def test_backend_is_available_and_reports_itself():
    ok, reason = native.available()
    info = native._C.build_info()
    assert ok and ("no CUDA" in reason) != info["cuda"] and f"torch {info['torch']}" in reason
    assert ("torch's BLAS" in reason) == (info["cpu_gemm"] == "blas")


@requires_extension
def test_reason_names_the_backend_that_runs_the_cuda_attention_backward(monkeypatch):
    """The extension has no CUDA attention backward: what runs instead is stated, not hidden."""
    cuda_build = dict(native._build_info(), cuda=True, cuda_archs=["90"], cuda_attention_backward=False)
    monkeypatch.setattr(native, "_build_info", lambda: cuda_build)
    fallback_name, _ = native._cuda_backward_fallback()
    reason = native.available.__wrapped__()[1]
    assert f"the attention backward on CUDA runs {fallback_name}" in reason
    assert "no CUDA" not in reason  # what a CPU-only build says (test_backend_is_available_and_reports_itself)
    assert ("Triton" in fallback_name) == fastgpt_kernels_available()
    monkeypatch.setattr(native, "_build_info", lambda: dict(cuda_build, cuda_attention_backward=True))
    assert "attention backward" not in native.available.__wrapped__()[1]


def fastgpt_kernels_available():
    from fastgpt import kernels

    return kernels.available()[0]


@requires_extension
def test_limits_come_from_the_extension(monkeypatch):
    """native.py keeps no copy of the kernels' limits: changing what build_info() reports changes its answers."""
    q = torch.randn(1, 1, 4, 200)
    assert native.attention_unsupported(q, q, q) is None
    monkeypatch.setattr(native, "_build_info", lambda: dict(native._C.build_info(), cpu_attention_max_head_dim=128))
    assert "head dim 200 > 128" in native.attention_unsupported(q, q, q)


@requires_extension
def test_registered_device_kernels_match_the_build(extension):
    """Every op has a CPU kernel; a CUDA build registers CUDA kernels for all but the attention
    backward it reports missing (checked without a GPU by CI's CUDA build, .ci/cuda_build)."""
    info = extension.build_info()
    cuda_expected = {
        "native_attention_forward": info["cuda_attention_forward"],
        "native_attention_backward": info["cuda_attention_backward"],
        "native_add_layer_norm_forward": info["cuda_add_layer_norm"],
        "native_add_layer_norm_backward": info["cuda_add_layer_norm"],
    }
    for op_name, on_cuda in cuda_expected.items():
        assert native._has_kernel(op_name, "cpu"), op_name
        assert native._has_kernel(op_name, "cuda") == on_cuda, op_name
    if info["cuda"]:
        assert info["cuda_attention_forward"] and info["cuda_add_layer_norm"]


@requires_extension
def test_large_cpu_outputs_reuse_cached_buffers(extension):
    """A freed output of 4 MiB or more is kept (up to the limit) and handed to the next output of
    its size; limit 0 keeps nothing; the values are right either way."""
    x, r = torch.randn(2048, 1024), torch.randn(2048, 1024)  # 8 MiB per output
    expected = torch.ops.fastgpt.native_add_layer_norm_forward(x, r, None, None, 1e-5, False, False)[0].clone()
    before = extension.cpu_output_cache()
    try:
        extension.empty_cpu_output_cache()
        y, h, _, _ = torch.ops.fastgpt.native_add_layer_norm_forward(x, r, None, None, 1e-5, False, False)
        assert extension.cpu_output_cache()["allocated_bytes"] >= 2 * (8 << 20)
        pointers = {y.data_ptr(), h.data_ptr()}
        del y, h
        assert extension.cpu_output_cache()["cached_bytes"] >= 2 * (8 << 20)
        y, h, _, _ = torch.ops.fastgpt.native_add_layer_norm_forward(x, r, None, None, 1e-5, False, False)
        assert {y.data_ptr(), h.data_ptr()} == pointers and torch.equal(y, expected)
        del y, h
        extension.set_cpu_output_cache_limit(0)
        assert extension.cpu_output_cache()["cached_bytes"] == 0
        y = torch.ops.fastgpt.native_add_layer_norm_forward(x, r, None, None, 1e-5, False, False)[0]
        y.resize_(4096, 1024)  # a cached buffer is an ordinary, resizable storage
        assert torch.equal(y[:2048], expected)
        del y
        assert extension.cpu_output_cache()["cached_bytes"] == 0
    finally:
        extension.set_cpu_output_cache_limit(before["limit_bytes"])


@requires_extension
def test_poison_hook_fills_outputs_with_nan(extension):
    # a row that sees no key (seq_q > seq_k, causal) must still be written: o = 0, lse = -inf
    q, k, v = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    extension._set_poison_outputs(True)
    try:
        o, lse = torch.ops.fastgpt.native_attention_forward(q, k, v, True, 0.5)
    finally:
        extension._set_poison_outputs(False)
    assert not o.isnan().any() and not lse.isnan().any()
    assert torch.equal(o[:, :, :3], torch.zeros_like(o[:, :, :3]))
    assert torch.isneginf(lse[:, :, :3]).all() and torch.isfinite(lse[:, :, 3:]).all()


@requires_extension
def test_every_output_element_is_written(extension):
    """With the hook on, an element a kernel skips stays NaN: results must not change at all."""

    def run_all():
        q, k, v = torch.randn(2, 4, 70, 24), torch.randn(2, 2, 50, 24), torch.randn(2, 2, 50, 24)
        o, lse = torch.ops.fastgpt.native_attention_forward(q, k, v, True, 0.3)
        grads = torch.ops.fastgpt.native_attention_backward(torch.ones_like(o), q, k, v, o, lse, True, 0.3)
        x, r, w, b, eps, rms, fp32 = small_norm_inputs()
        y, h, mean, rstd = torch.ops.fastgpt.native_add_layer_norm_forward(x, r, w, b, eps, rms, fp32)
        norm_grads = torch.ops.fastgpt.native_add_layer_norm_backward(x, r, h, w, b, mean, rstd, rms)
        return (o, lse, *grads, y, h, mean, rstd, *norm_grads)

    torch.manual_seed(0)
    clean = run_all()
    extension._set_poison_outputs(True)
    try:
        torch.manual_seed(0)
        poisoned = run_all()
    finally:
        extension._set_poison_outputs(False)
    for a, b in zip(clean, poisoned):
        assert not b.isnan().any()
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [True, False])
@requires_extension
def test_opcheck_attention_ops(causal):
    q, k, v, causal, scale = small_attention_inputs(causal=causal)
    torch.library.opcheck(torch.ops.fastgpt.native_attention_forward.default, (q, k, v, causal, scale))
    o, lse = torch.ops.fastgpt.native_attention_forward(q, k, v, causal, scale)
    do = torch.randn_like(o)
    torch.library.opcheck(
        torch.ops.fastgpt.native_attention_backward.default, (do, q, k, v, o, lse, causal, scale)
    )


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@requires_extension
def test_opcheck_add_layer_norm_ops(rms):
    args = small_norm_inputs(rms)
    torch.library.opcheck(torch.ops.fastgpt.native_add_layer_norm_forward.default, args)
    x, r, w, b, eps, rms, _ = args
    _, h, mean, rstd = torch.ops.fastgpt.native_add_layer_norm_forward(*args)
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.fastgpt.native_add_layer_norm_backward.default, (dy, dh, h, w, b, mean, rstd, rms)
    )
    torch.library.opcheck(
        torch.ops.fastgpt.native_add_layer_norm_backward.default, (dy, None, h, None, None, mean, rstd, rms)
    )


@requires_extension
def test_absent_parameters_give_empty_gradients_and_none_in_the_contract():
    x, r, _, _, eps, _, _ = small_norm_inputs()
    _, h, mean, rstd = native.add_layer_norm_forward(x, r, None, None, eps, False, False)
    dx, dweight, dbias = torch.ops.fastgpt.native_add_layer_norm_backward(
        torch.randn_like(x), None, h, None, None, mean, rstd, False
    )
    assert dweight.shape == (0,) and dbias.shape == (0,)
    assert native.add_layer_norm_backward(torch.randn_like(x), None, h, None, None, mean, rstd, False)[1:] == (
        None,
        None,
    )


@requires_extension
def test_backward_is_deterministic():
    q, k, v = (torch.randn(2, 4, 200, 32), torch.randn(2, 2, 200, 32), torch.randn(2, 2, 200, 32))
    o, lse = native.attention_forward(q, k, v, True, 0.2)
    do = torch.randn_like(o)
    first = native.attention_backward(do, q, k, v, o, lse, True, 0.2)
    second = native.attention_backward(do, q, k, v, o, lse, True, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    _, _, w, b, eps, rms, fp32 = small_norm_inputs()
    x, r = torch.randn(300, 40), torch.randn(300, 40)
    _, h, mean, rstd = native.add_layer_norm_forward(x, r, w, b, eps, rms, fp32)
    dy = torch.randn_like(x)
    first = native.add_layer_norm_backward(dy, None, h, w, b, mean, rstd, rms)
    second = native.add_layer_norm_backward(dy, None, h, w, b, mean, rstd, rms)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.fixture(params=["blas", "aten"])
def cpu_gemm(request, extension):
    """Both ways the CPU kernels multiply tiles: torch's BLAS called directly (bf16 tiles in bf16
    where build_info()["cpu_bf16_gemm"]), and at::cpu::addmm_ on fp32 tiles."""
    if request.param == "blas" and extension.build_info()["cpu_gemm"] != "blas":
        pytest.skip("this torch exports no sgemm_: the kernels always take the aten path")
    extension._set_force_aten_gemm(request.param == "aten")
    yield request.param
    extension._set_force_aten_gemm(False)


@pytest.mark.parametrize("seq_q, seq_k", [(300, 700), (700, 300)], ids=["sq<sk", "sq>sk"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
@requires_extension
def test_long_attention_matches_float64(dtype, tolerance, seq_q, seq_k, cpu_gemm):
    """Several query and key blocks (forward and backward), causal row bands, GQA, a strided layout."""
    from fastgpt import reference

    q = torch.randn(1, seq_q, 4, 40).transpose(1, 2).to(dtype)
    k, v = torch.randn(1, 2, seq_k, 40, dtype=dtype), torch.randn(1, 2, seq_k, 40, dtype=dtype)
    q64, k64, v64 = q.double(), k.double(), v.double()
    for causal in (True, False):
        o, lse = native.attention_forward(q, k, v, causal, 0.15)
        o_ref, lse_ref = reference.attention_forward(q64, k64, v64, causal, 0.15)
        assert (o.double() - o_ref).norm() / o_ref.norm() < tolerance
        seen = lse_ref > float("-inf")  # causal with seq_q > seq_k: the first rows see no key
        assert torch.equal(lse > float("-inf"), seen)
        assert (lse.double() - lse_ref)[seen].abs().max() < (1e-4 if dtype == torch.float32 else 5e-2)
        do = torch.randn_like(o)
        grads = native.attention_backward(do, q, k, v, o, lse, causal, 0.15)
        grads_ref = reference.attention_backward(do.double(), q64, k64, v64, o_ref, lse_ref, causal, 0.15)
        for g, g_ref in zip(grads, grads_ref):
            assert g.dtype == dtype and (g.double() - g_ref).norm() / g_ref.norm() < 2 * tolerance
        # rounding to bf16 on the way into a product must be unbiased: a bias scales every output
        # (a rounding biased upwards by an eighth of a bf16 step measured 6e-4 here, correct rounding 4e-5)
        for name, t, t_ref in zip(("o", "dq", "dk", "dv"), (o, *grads), (o_ref, *grads_ref)):
            scale_error = ((t.double() - t_ref) * t_ref).sum() / (t_ref * t_ref).sum()
            assert abs(scale_error) < 2e-4, f"{name} is off by a factor of 1 + {scale_error:.2e}"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda q, k, v: (q[0], k, v), "q must be 4-dimensional"),
        (lambda q, k, v: (q, k.double(), v), "k must be float32, float16 or bfloat16"),
        (lambda q, k, v: (q, k.half(), v.half()), "k must have the dtype of q"),
        (lambda q, k, v: (q, k, v[:, :, :5]), "k and v must have the same shape"),
        (lambda q, k, v: (q, k[:, :, :, :8], v[:, :, :, :8]), "k must have shape"),
        (lambda q, k, v: (q, k[:, :1].expand(1, 3, 11, 16), v[:, :1].expand(1, 3, 11, 16)), "multiple of"),
        (lambda q, k, v: (torch.randn(1, 2, 3, 300), torch.randn(1, 2, 3, 300), torch.randn(1, 2, 3, 300)),
         "head_dim must be at most 256"),
        (lambda q, k, v: (q[:, :, :0], k, v), "q must have no empty dimension"),
    ],
)
@requires_extension
def test_bad_attention_inputs_raise_clear_errors(mutate, message):
    q, k, v, causal, scale = small_attention_inputs()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastgpt.native_attention_forward(*mutate(q, k, v), causal, scale)


@requires_extension
def test_bad_attention_backward_inputs_raise_clear_errors():
    q, k, v, causal, scale = small_attention_inputs()
    o, lse = torch.ops.fastgpt.native_attention_forward(q, k, v, causal, scale)
    with pytest.raises(RuntimeError, match="grad_out must be a CPU tensor with the shape"):
        torch.ops.fastgpt.native_attention_backward(o[:, :2], q, k, v, o, lse, causal, scale)
    with pytest.raises(RuntimeError, match="lse must be a float32 CPU tensor"):
        torch.ops.fastgpt.native_attention_backward(o, q, k, v, o, lse.double(), causal, scale)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x, r, w, b: (x, r[:, :, :7], w, b), "residual must have the shape of x"),
        (lambda x, r, w, b: (x, r.double(), w, b), "residual must be float32, float16 or bfloat16"),
        (lambda x, r, w, b: (x.half(), r.bfloat16(), w, b), "residual must have the dtype of x"),
        (lambda x, r, w, b: (x, r, w[:7], b), r"weight must have shape \(40,\)"),
        (lambda x, r, w, b: (x, r, w, b.int()), "bias must be float32, float16 or bfloat16"),
        (lambda x, r, w, b: (x[:, :, :0], r[:, :, :0], None, None), "x must be non-empty"),
    ],
)
@requires_extension
def test_bad_add_layer_norm_inputs_raise_clear_errors(mutate, message):
    x, r, w, b, eps, rms, fp32 = small_norm_inputs()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastgpt.native_add_layer_norm_forward(*mutate(x, r, w, b), eps, rms, fp32)
    with pytest.raises(RuntimeError, match="eps must be positive"):
        torch.ops.fastgpt.native_add_layer_norm_forward(x, r, w, b, 0.0, rms, fp32)


@requires_extension
def test_bad_add_layer_norm_backward_inputs_raise_clear_errors():
    x, r, w, b, eps, rms, fp32 = small_norm_inputs()
    _, h, mean, rstd = torch.ops.fastgpt.native_add_layer_norm_forward(x, r, w, b, eps, rms, fp32)
    dy = torch.randn_like(x)
    with pytest.raises(RuntimeError, match="grad_y must have the shape of h"):
        torch.ops.fastgpt.native_add_layer_norm_backward(dy[:1], None, h, w, b, mean, rstd, rms)
    with pytest.raises(RuntimeError, match="rstd must be a float32 CPU tensor with one value per row"):
        torch.ops.fastgpt.native_add_layer_norm_backward(dy, None, h, w, b, mean, rstd[:1], rms)


@requires_extension
def test_unsupported_inputs_are_reported():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    assert "float64" in native.attention_unsupported(q, q, q)
    wide = torch.randn(1, 1, 4, 512)
    assert "head dim" in native.attention_unsupported(wide, wide, wide)
    assert native.attention_unsupported(*small_attention_inputs()[:3]) is None
    x = torch.randn(2, 8, dtype=torch.float64)
    assert "float64" in native.add_layer_norm_unsupported(x, x, None, None)
    assert native.add_layer_norm_unsupported(*small_norm_inputs()[:4]) is None


def test_package_imports_without_the_extension(monkeypatch):
    """A failed build must not break `import fastgpt`: the native backend reports why it is unavailable."""
    from fastgpt import extension

    was_available = native.available()[0]
    monkeypatch.setattr(extension, "load", lambda: extension.Loaded(None, "simulated: fastgpt._C is missing"))
    try:
        reloaded = importlib.reload(native)
        ok, reason = reloaded.available()
        assert not ok and "simulated: fastgpt._C is missing" in reason
        q = torch.randn(1, 1, 4, 8)
        assert "fastgpt._C" in reloaded.attention_unsupported(q, q, q)
        assert "fastgpt._C" in reloaded.add_layer_norm_unsupported(q, q, None, None)
        import fastgpt

        report = fastgpt.backends()
        assert report["native"]["available"] is False and "simulated" in report["native"]["reason"]
        assert report["reference"]["available"] is True
    finally:
        monkeypatch.undo()
        importlib.reload(native)
    assert native.available()[0] == was_available
