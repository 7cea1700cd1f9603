"""fastgpt.ops.attention: every backend against a float64 formula written here, forward and backward."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from attention_oracle import assert_forward_matches, assert_grads_match, attention_float64
from conftest import BACKENDS, assert_close, skip_unless_runs, skip_unless_supports

import fastgpt
from fastgpt import ops, registry

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (batch, heads, kv_heads, seq_q, seq_k, head_dim, causal): odd sizes, GQA/MQA, decode, sq > sk
SHAPES = [
    (1, 1, 1, 1, 1, 16, True),
    (2, 3, 3, 7, 7, 24, True),
    (1, 4, 2, 33, 65, 40, True),  # more keys than queries: a chunk of new tokens against a cache
    (2, 2, 1, 65, 33, 16, True),  # more queries than keys: the first rows see no key at all
    (1, 2, 2, 1, 130, 64, True),  # decode: one query against a long cache
    (2, 4, 1, 17, 17, 80, False),  # multi-query, not causal
    (1, 2, 2, 64, 64, 128, True),
    (1, 2, 1, 9, 9, 160, True),
    (1, 1, 1, 5, 9, 256, False),
    # a few queries against a cache (Triton's decode kernel: GQA heads packed into one tile, keys split)
    (2, 8, 2, 1, 77, 64, True),
    (1, 4, 1, 3, 50, 40, True),
    (1, 3, 1, 4, 45, 24, False),
    (1, 2, 2, 2, 1, 16, True),  # more queries than keys: the first sees none
]


def make_qkv(shape, dtype, device, layout):
    """Random q, k, v; "strided" builds them as views of (batch, seq, heads, wider_dim) tensors."""
    b, h, kvh, sq, sk, d, _ = shape

    def one(heads, seq):
        if layout == "contiguous":
            return torch.randn(b, heads, seq, d, dtype=dtype, device=device)
        wide = torch.randn(b, seq, heads, d + 3, dtype=dtype, device=device)
        return wide[..., 1 : d + 1].transpose(1, 2)

    return one(h, sq), one(kvh, sk), one(kvh, sk)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}kv{}q{}k{}d{}{}".format(*s[:6], "c" if s[6] else ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_match_float64(backend, shape, dtype, layout, device, poisoned_outputs):
    skip_unless_runs(backend, device, dtype)
    causal = shape[-1]
    q, k, v = make_qkv(shape, dtype, device, layout)
    skip_unless_supports("attention", backend, q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    do = torch.randn(q.shape, dtype=dtype, device=device)

    o, lse = torch.ops.fastgpt.attention(q, k, v, causal, scale, backend)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    o64, lse64 = attention_float64(q64, k64, v64, causal, scale)
    o64.backward(do.cpu().double())

    assert_forward_matches(o, lse, o64, lse64, q, dtype)

    grads = torch.ops.fastgpt.attention_backward(do, q, k, v, o, lse, causal, scale, backend)
    assert_grads_match(grads, (q64.grad, k64.grad, v64.grad), (q, k, v), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_through_public_op(backend, device):
    skip_unless_runs(backend, device)
    shape = (2, 4, 2, 19, 19, 32, True)
    q, k, v = (t.requires_grad_() for t in make_qkv(shape, torch.float32, device, "strided"))
    skip_unless_supports("attention", backend, q, k, v)
    o = ops.attention(q, k, v, causal=True, scale=0.3, backend=backend)
    do = torch.randn_like(o)
    o.backward(do)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    o64, _ = attention_float64(q64, k64, v64, True, 0.3)
    o64.backward(do.cpu().double())
    assert_close("o", o, o64, torch.float32)
    for name, t, t64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_close(name, t.grad, t64.grad, torch.float32, factor=2.0)


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != registry.FALLBACK])
def test_backward_accepts_reference_forward(backend, device):
    """The shared contract: any backend's backward runs on any backend's (o, lse)."""
    skip_unless_runs(backend, device)
    q, k, v = make_qkv((1, 4, 2, 23, 23, 48, True), torch.float32, device, "contiguous")
    skip_unless_supports("attention", backend, q, k, v)
    do = torch.randn_like(q)
    o, lse = torch.ops.fastgpt.attention(q, k, v, True, 0.2, "reference")
    expected = torch.ops.fastgpt.attention_backward(do, q, k, v, o, lse, True, 0.2, "reference")
    got = torch.ops.fastgpt.attention_backward(do, q, k, v, o, lse, True, 0.2, backend)
    for name, g, e in zip(("dq", "dk", "dv"), got, expected):
        assert_close(name, g, e, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile_fullgraph(backend, device):
    skip_unless_runs(backend, device)
    q, k, v = (t.requires_grad_() for t in make_qkv((1, 2, 1, 9, 9, 16, True), torch.float32, device, "contiguous"))
    skip_unless_supports("attention", backend, q, k, v)
    torch.library.opcheck(torch.ops.fastgpt.attention.default, (q, k, v, True, 0.25, backend))

    def loss(q, k, v):
        return ops.attention(q, k, v, backend=backend).square().sum()

    torch._dynamo.reset()  # every (backend, variant) is a recompile of the same code; stay under the limit
    compiled = torch.compile(loss, fullgraph=True, backend="eager")
    compiled(q, k, v).backward()
    expected_grad = q.grad.clone()
    q.grad = None
    loss(q, k, v).backward()
    assert_close("dq", expected_grad, q.grad, torch.float32)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"is_causal": True},
        {"is_causal": True, "scale": 0.5},
        {"attn_mask": "bool"},
        {"dropout_p": 0.0, "is_causal": False, "enable_gqa": True},
    ],
    ids=["plain", "causal", "causal-scale", "mask", "gqa"],
)
def test_scaled_dot_product_attention_matches_torch(kwargs, device):
    kwargs = dict(kwargs)
    kv_heads = 2 if kwargs.get("enable_gqa") else 4
    q = torch.randn(2, 4, 11, 16, device=device)
    k, v = torch.randn(2, kv_heads, 11, 16, device=device), torch.randn(2, kv_heads, 11, 16, device=device)
    if kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.rand(11, 11, device=device) > 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fallback to the reference is fine here
        out = ops.scaled_dot_product_attention(q, k, v, **kwargs)
    assert_close("out", out, F.scaled_dot_product_attention(q, k, v, **kwargs), torch.float32)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        ops.attention(q.tolist(), k, k)
    with pytest.raises(ValueError, match="q must be 4-dimensional"):
        ops.attention(q[0], k, k)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        ops.attention(q, k.half(), k)
    with pytest.raises(ValueError, match="multiple of"):
        ops.attention(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))
    with pytest.raises(ValueError, match="k must have shape"):
        ops.attention(q, torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        ops.attention(q, k, torch.randn(1, 2, 9, 16))
    with pytest.raises(TypeError, match="floating-point"):
        ops.attention(q.long(), k.long(), k.long())
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.attention(q, k, k, backend="cuda")
    with pytest.raises(TypeError, match="scale must be a finite float"):
        ops.attention(q, k, k, scale=float("nan"))
    with pytest.raises(ValueError, match="no empty dimension"):
        ops.attention(q[:, :, :0], k, k)


def test_named_backend_that_cannot_run_raises():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    unsupported = [name for name, info in fastgpt.backends().items() if name != "reference"]
    for name in unsupported:  # float64 is the reference's alone
        with pytest.raises(fastgpt.BackendError, match=name):
            ops.attention(q, q, q, backend=name)


def test_auto_falls_back_with_one_warning(fresh_warnings):
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="falls back to the reference backend") as record:
        first = ops.attention(q, q, q)
        second = ops.attention(q, q, q)
    fallbacks = [w for w in record if "falls back" in str(w.message)]
    assert len(fallbacks) == 1
    assert fallbacks[0].filename == __file__  # names the caller's line, not torch's dispatch
    assert torch.equal(first, second)
    assert_close("o", first, attention_float64(q, q, q, True, 1 / math.sqrt(8))[0], torch.float32)


def test_environment_variable_picks_the_backend(monkeypatch):
    q = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    monkeypatch.setenv("FASTGPT_BACKEND", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the named reference backend runs float64 without falling back
        ops.attention(q, q, q)
    monkeypatch.setenv("FASTGPT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTGPT_BACKEND"):
        ops.attention(q, q, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: long sequences are too slow for the interpreter")
@pytest.mark.parametrize("seq", [4096, 16384])
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_long_sequences_on_cuda(backend, seq):
    """bf16 at long lengths against torch SDPA run in float32 (a float64 reference would not fit)."""
    q = torch.randn(1, 4, seq, 128, dtype=torch.bfloat16, device="cuda")
    k, v = torch.randn(2, 1, 2, seq, 128, dtype=torch.bfloat16, device="cuda").unbind(0)
    skip_unless_supports("attention", backend, q, k, v)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = ops.attention(*leaves, causal=True, backend=backend)
    do = torch.randn_like(o)
    o.backward(do)
    leaves32 = [t.float().requires_grad_() for t in (q, k, v)]
    o32 = F.scaled_dot_product_attention(*leaves32, is_causal=True, enable_gqa=True)
    o32.backward(do.float())
    assert_close("o", o, o32, torch.bfloat16)
    for name, t, t32 in zip(("dq", "dk", "dv"), leaves, leaves32):
        assert_close(name, t.grad, t32.grad, torch.bfloat16, factor=2.0)
    # decoding the last position against the whole cache (Triton: the decode kernel, keys split
    # across the GPU); bottom-right causal, it sees every key
    last = q[:, :, -1:]
    o_last = ops.attention(last, k, v, causal=True, backend=backend)
    o_last32 = F.scaled_dot_product_attention(last.float(), k.float(), v.float(), enable_gqa=True)
    assert_close("o (decode)", o_last, o_last32, torch.bfloat16)


def test_triton_decode_plan():
    """Up to DECODE_MAX_QUERIES queries go to Triton's decode kernel; in the tests' decode shapes
    the keys are split (so the merge kernel runs too) under the interpreter."""
    try:
        from fastgpt.kernels import interpreting
        from fastgpt.kernels.attention_decode import decode_plan
    except ImportError as exc:
        pytest.skip(f"needs triton: {exc}")
    if not interpreting():
        pytest.skip("the split count on a GPU depends on its multiprocessor count")
    q = torch.empty(0)
    plan = decode_plan(2, 2, 4, 1, 77, 64, q)
    assert plan is not None and plan.splits > 1 and plan.block_m == 16
    assert plan.splits * plan.keys_per_split >= 77 > (plan.splits - 1) * plan.keys_per_split
    assert decode_plan(1, 1, 1, 1, 1, 16, q).splits == 1  # one tile: no merge
    assert decode_plan(1, 4, 1, 5, 50, 40, q) is None  # more queries: the forward kernel
    assert decode_plan(1, 1, 32, 4, 50, 40, q) is None  # more than 64 rows
