"""The attention variants (sliding window, soft-capping, packed sequences) on every backend that
declares them, against the float64 formula with an explicit mask (tests/attention_oracle.py); backends that do not
declare one decline it with a reason, and ``auto`` passes them by."""

import dataclasses
import math
import random
import warnings

import numpy
import pytest
import torch
import wrapper_backend
from attention_oracle import assert_forward_matches, assert_grads_match, attention_float64
from conftest import BACKENDS, assert_close, skip_unless_runs, skip_unless_supports

import fastgpt
from fastgpt import dispatch, ops, registry

# the tests' wrapper backend registered a second time, declaring every variant (the one in
# conftest.py declares none): a backend from outside the package receives the variants' arguments
WRAPPED_VARIANTS = dataclasses.replace(
    registry.get(wrapper_backend.NAME), name="wrapped_variants", variants=set(registry.VARIANTS)
)
ALL_BACKENDS = BACKENDS + [WRAPPED_VARIANTS.name]


@pytest.fixture(autouse=True, scope="module")
def wrapped_variants_registered():
    registry.register_backend(WRAPPED_VARIANTS, replace=True)
    yield
    registry.unregister_backend(WRAPPED_VARIANTS.name)


def declared(name):
    return (WRAPPED_VARIANTS if name == WRAPPED_VARIANTS.name else registry.get(name)).variants


def backends_declaring(*variants, among=ALL_BACKENDS):
    return [name for name in among if set(variants) <= declared(name)]


def random_tensor(shape, dtype, device, layout, scale=1.0):
    """A random tensor of ``shape`` (last dim = head dim); "strided" makes it a view of a wider one."""
    if layout == "contiguous":
        return (torch.randn(shape) * scale).to(dtype=dtype, device=device)
    wide = (torch.randn(*shape[:-1], shape[-1] + 3) * scale).to(dtype=dtype, device=device)
    return wide[..., 1 : shape[-1] + 1]


def make_qkv(b, h, kvh, sq, sk, d, dtype, device, layout, scale=1.0):
    if layout == "contiguous":
        return (random_tensor((b, n, s, d), dtype, device, layout, scale) for n, s in ((h, sq), (kvh, sk), (kvh, sk)))
    # views of (batch, seq, heads, wider) tensors, as a model's projections give them
    return (random_tensor((b, s, n, d), dtype, device, layout, scale).transpose(1, 2) for n, s in ((h, sq), (kvh, sk), (kvh, sk)))


def variants_of(window, softcap):
    return {name for name, used in (("window", window is not None), ("softcap", softcap > 0)) if used}


# (batch, heads, kv_heads, seq_q, seq_k, head_dim, causal, window, softcap, input scale)
CASES = [
    (1, 2, 1, 9, 9, 16, True, (0, 0), 0.0, 1.0),  # each query sees itself only
    (2, 2, 2, 7, 12, 16, True, (1, 0), 0.0, 1.0),  # a chunk against a cache, window 1
    (1, 4, 2, 13, 13, 24, False, (3, 2), 0.0, 1.0),
    (1, 2, 2, 5, 9, 16, False, (-1, 1), 0.0, 1.0),  # left unbounded
    (1, 2, 1, 9, 5, 16, False, (2, -1), 0.0, 1.0),  # right unbounded, more queries than keys
    (1, 2, 2, 11, 11, 16, True, (100, 0), 0.0, 1.0),  # larger than the sequence
    (1, 2, 2, 10, 6, 16, False, (1, 2), 0.0, 1.0),  # the first two rows see no key
    (2, 2, 1, 12, 7, 16, False, (1, 0), 0.0, 1.0),  # right side 0: causal; the first five rows see nothing
    (1, 2, 1, 1, 20, 16, True, (4, 0), 0.0, 1.0),  # decode with a window
    (1, 2, 2, 9, 9, 16, True, None, 5.0, 3.0),  # soft cap, causal
    (2, 4, 2, 7, 11, 24, False, None, 1.0, 3.0),  # a strong cap, not causal
    (1, 2, 1, 13, 13, 16, True, (3, 0), 2.0, 3.0),  # both
]


def case_id(c):
    b, h, kvh, sq, sk, d, causal, window, softcap, _ = c
    return f"b{b}h{h}kv{kvh}q{sq}k{sk}d{d}{'c' if causal else ''}w{window}s{softcap}".replace(" ", "")


# the dtype and layout matrices run on the registered backends (the variant-declaring wrapper only
# repeats the reference there; the shorter tests below run it)
PARAMS = [
    pytest.param(backend, case, id=f"{backend}-{case_id(case)}")
    for case in CASES
    for backend in backends_declaring(*variants_of(case[7], case[8]), among=BACKENDS)
]


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,case", PARAMS)
def test_window_and_softcap_match_float64(backend, case, dtype, layout, device, poisoned_outputs):
    b, h, kvh, sq, sk, d, causal, window, softcap, input_scale = case
    skip_unless_runs(backend, device, dtype)
    q, k, v = make_qkv(b, h, kvh, sq, sk, d, dtype, device, layout, input_scale)
    skip_unless_supports("attention", backend, q, k, v)
    scale = 1.0 / math.sqrt(d)
    left, right = window if window is not None else (-1, -1)
    do = torch.randn(q.shape, dtype=dtype, device=device)

    o, lse = torch.ops.fastgpt.attention(q, k, v, causal, scale, backend, False, left, right, softcap)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    o64, lse64 = attention_float64(q64, k64, v64, causal, scale, window, softcap)
    o64.backward(do.cpu().double())

    seen = assert_forward_matches(o, lse, o64, lse64, q, dtype)
    assert (o.cpu()[~seen] == 0).all(), "a row that sees no key outputs zeros"

    grads = torch.ops.fastgpt.attention_backward(do, q, k, v, o, lse, causal, scale, backend, left, right, softcap)
    assert_grads_match(grads, (q64.grad, k64.grad, v64.grad), (q, k, v), dtype)


@pytest.mark.parametrize("backend", backends_declaring("window"))
def test_random_windows_through_the_public_op(backend, device):
    """Random windows (0, 1, wider than the sequence, unbounded sides), with and without causal and
    a soft cap where the backend has one, forward and backward through ``ops.attention``."""
    skip_unless_runs(backend, device)
    # seeded: an unseeded draw once gave the torch backend a one-query row seeing two keys whose fp32 dq
    # (a difference of two nearly equal terms) missed the relative tolerance, 1.8e-4 > 4e-5
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(6):
        sq, sk = rng.randint(1, 12), rng.randint(1, 12)
        window = (rng.choice([-1, 0, 1, rng.randint(0, 15)]), rng.choice([-1, 0, 1, rng.randint(0, 15)]))
        causal = rng.random() < 0.5
        softcap = rng.choice([0.0, 2.5]) if "softcap" in declared(backend) else 0.0
        q, k, v = (t.requires_grad_() for t in make_qkv(1, 4, 2, sq, sk, 16, torch.float32, device, "strided", 2.0))
        skip_unless_supports("attention", backend, q, k, v)
        o = ops.attention(q, k, v, causal=causal, scale=0.3, window=window, softcap=softcap, backend=backend)
        do = torch.randn_like(o)
        o.backward(do)
        q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
        o64, _ = attention_float64(q64, k64, v64, causal, 0.3, window, softcap)
        o64.backward(do.cpu().double())
        where = f"seq_q={sq} seq_k={sk} causal={causal} window={window} softcap={softcap}"
        assert_close(f"o ({where})", o, o64, torch.float32)
        for name, t, t64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
            assert_close(f"{name} ({where})", t.grad, t64.grad, torch.float32, factor=2.0)


# ----------------------------------------------------------------------------- packed sequences


def packed(lengths, heads, d, dtype, device, layout):
    """A packed (total, heads, d) tensor; "strided" makes it a view of a wider one."""
    return random_tensor((sum(lengths), heads, d), dtype, device, layout)


def offsets(lengths, device):
    return torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)


def dense(t, start, end):
    return t[start:end].transpose(0, 1).unsqueeze(0)


# (query lengths, key lengths): empty, 1, odd, mixed; more keys (a cache), a sequence without keys,
# more queries than keys (rows that see nothing)
LENGTHS = [
    ([0, 1, 7, 3, 0, 12], [0, 1, 7, 3, 0, 12]),
    ([1, 4, 0, 5], [3, 9, 2, 5]),
    ([2, 3], [0, 4]),
    ([6, 2, 1], [3, 2, 1]),
]
VARLEN_OPTIONS = [(True, None, 0.0), (False, None, 0.0), (True, (2, 0), 0.0), (False, (1, 3), 0.0), (True, None, 3.0), (False, (2, 1), 2.0)]
VARLEN_PARAMS = [
    pytest.param(backend, causal, window, softcap, id=f"{backend}-{'c' if causal else ''}w{window}s{softcap}".replace(" ", ""))
    for causal, window, softcap in VARLEN_OPTIONS
    for backend in backends_declaring("varlen", *variants_of(window, softcap), among=BACKENDS)
]


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda c: f"q{c[0]}k{c[1]}".replace(" ", ""))
@pytest.mark.parametrize("backend,causal,window,softcap", VARLEN_PARAMS)
def test_varlen_matches_each_sequence_alone(backend, causal, window, softcap, lengths, dtype, layout, device, poisoned_outputs):
    """Each packed sequence against the float64 formula on that sequence alone, forward (o and the
    lse, ``(heads, total_q)``) and backward, through the custom ops that torch.compile sees."""
    skip_unless_runs(backend, device, dtype)
    lengths_q, lengths_k = lengths
    heads, kv_heads, d = 4, 2, 16
    q = packed(lengths_q, heads, d, dtype, device, layout)
    k, v = (packed(lengths_k, kv_heads, d, dtype, device, layout) for _ in range(2))
    skip_unless_supports("attention", backend, *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)))
    cu_q, cu_k = offsets(lengths_q, device), offsets(lengths_k, device)
    scale = 0.4
    left, right = window if window is not None else (-1, -1)
    do = torch.randn(q.shape, dtype=dtype, device=device)

    o, lse = torch.ops.fastgpt.varlen_attention(q, k, v, cu_q, cu_k, None, None, causal, scale, backend, False, left, right, softcap)
    assert o.shape == q.shape and o.dtype == dtype and o.is_contiguous()
    assert lse.shape == (heads, q.shape[0]) and lse.dtype == torch.float32
    dq, dk, dv = torch.ops.fastgpt.varlen_attention_backward(
        do, q, k, v, o, lse, cu_q, cu_k, max(lengths_q), max(lengths_k), causal, scale, backend, left, right, softcap
    )
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    parts_o, parts_lse = [], []
    for b in range(len(lengths_q)):
        qs, qe, ks, ke = cu_q[b].item(), cu_q[b + 1].item(), cu_k[b].item(), cu_k[b + 1].item()
        o_b, lse_b = attention_float64(dense(q64, qs, qe), dense(k64, ks, ke), dense(v64, ks, ke), causal, scale, window, softcap)
        parts_o.append(o_b[0].transpose(0, 1))
        parts_lse.append(lse_b[0])
    o64, lse64 = torch.cat(parts_o), torch.cat(parts_lse, dim=1)
    o64.backward(do.cpu().double())

    assert_close("o", o, o64, dtype)
    seen = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse).cpu(), seen), "lse must be -inf exactly for rows that see no key"
    assert_close("lse", lse.cpu()[seen], lse64[seen], dtype)
    for name, grad, t64, like in (("dq", dq, q64, q), ("dk", dk, k64, k), ("dv", dv, v64, v)):
        assert grad.dtype == like.dtype and grad.shape == like.shape
        assert_close(name, grad, t64.grad, dtype, factor=2.0)


@pytest.mark.parametrize("backend", backends_declaring("varlen", "window"))
def test_varlen_is_attention_on_each_sequence(backend, device):
    """``varlen_attention`` through autograd equals ``attention`` run on each sequence alone."""
    skip_unless_runs(backend, device)
    lengths_q, lengths_k = [3, 1, 8, 5], [3, 4, 8, 9]
    q = packed(lengths_q, 4, 24, torch.float32, device, "strided").requires_grad_()
    k, v = (packed(lengths_k, 1, 24, torch.float32, device, "strided").requires_grad_() for _ in range(2))
    skip_unless_supports("attention", backend, *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)))
    cu_q, cu_k = offsets(lengths_q, device), offsets(lengths_k, device)
    o = ops.varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q=8, max_seqlen_k=9, window=(2, 0), backend=backend)
    do = torch.randn_like(o)
    o.backward(do)
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected = []
    for b in range(len(lengths_q)):
        qs, qe, ks, ke = cu_q[b].item(), cu_q[b + 1].item(), cu_k[b].item(), cu_k[b + 1].item()
        o_b = ops.attention(dense(q, qs, qe), dense(k, ks, ke), dense(v, ks, ke), window=(2, 0), backend=backend)
        expected.append(o_b[0].transpose(0, 1))
    expected = torch.cat(expected)
    expected.backward(do)
    assert_close("o", o, expected, torch.float32)
    for name, got, t in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        assert_close(name, got, t.grad, torch.float32)


def test_a_registered_backend_receives_the_variants():
    before = dict(wrapper_backend.calls)
    q = torch.randn(5, 2, 8, requires_grad=True)
    cu = offsets([2, 3], "cpu")
    ops.varlen_attention(q, q, q, cu, cu, window=(1, 0), softcap=2.0, backend=WRAPPED_VARIANTS.name).sum().backward()
    ops.attention(q[None].transpose(1, 2), q[None].transpose(1, 2), q[None].transpose(1, 2), softcap=2.0, backend=WRAPPED_VARIANTS.name).sum().backward()
    for name in ("varlen_attention_forward", "varlen_attention_backward", "attention_forward", "attention_backward"):
        assert wrapper_backend.calls[name] == before.get(name, 0) + 1, name


# ----------------------------------------------------------------------------- declaring variants


UNDECLARED = [
    pytest.param(backend, variant, id=f"{backend}-{variant}")
    for backend in BACKENDS
    for variant in registry.VARIANTS
    if variant not in registry.get(backend).variants
]


@pytest.mark.parametrize("backend,variant", UNDECLARED)
def test_a_backend_without_a_variant_declines_it(backend, variant):
    info = fastgpt.backends()[backend]
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
    reason = dispatch.unsupported_reason("attention", backend, (q, k, v), {variant})
    expected = info["reason"] if not info["available"] else f"the {backend} backend has no {registry.VARIANTS[variant]} kernel"
    assert reason == expected
    with pytest.raises(fastgpt.BackendError, match=backend):
        if variant == "varlen":
            cu = offsets([5], "cpu")
            ops.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, backend=backend)
        else:
            ops.attention(q, k, v, **{"window": {"window": (2, 0)}, "softcap": {"softcap": 3.0}}[variant], backend=backend)


def test_builtin_declarations():
    assert registry.get("reference").variants == set(registry.VARIANTS)  # the fallback runs them all
    assert registry.get("torch").variants == {"window", "varlen"}  # torch's kernels have no soft cap
    assert registry.get("native").variants == registry.get("triton").variants == set(registry.VARIANTS)


@pytest.mark.parametrize("variants", [{"window"}, {"softcap"}, {"varlen"}, {"window", "softcap"}], ids=sorted)
def test_auto_picks_a_backend_that_has_the_variant(variants, fresh_warnings):
    """auto passes by backends without the variant: silently when another fast backend has it,
    with one warning naming the reasons when only the reference has it."""
    dispatch.forget_decisions()
    window, softcap = ((2, 0) if "window" in variants else None), (3.0 if "softcap" in variants else 0.0)
    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    chosen = dispatch.auto_choice("attention", (q, k, v), variants=variants)
    candidates = [b.name for b in registry.auto_candidates("cpu") if dispatch.unsupported_reason("attention", b.name, (q, k, v), variants) is None]
    assert chosen == (candidates[0] if candidates else registry.FALLBACK)
    assert variants <= registry.get(chosen).variants
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if variants == {"varlen"}:
            cu = offsets([4, 5], "cpu")
            packed_qkv = [t[0].transpose(0, 1) for t in (q, k, v)]
            out = ops.varlen_attention(*packed_qkv, cu, cu)
            expected = ops.varlen_attention(*packed_qkv, cu, cu, backend="reference")
        else:
            out = ops.attention(q, k, v, window=window, softcap=softcap)
            out = ops.attention(q, k, v, window=window, softcap=softcap)  # warned once only
            expected = attention_float64(q, k, v, True, 0.25, window, softcap)[0]
    fallbacks = [str(w.message) for w in record if "falls back" in str(w.message)]
    if chosen == registry.FALLBACK:
        assert len(fallbacks) == 1 and "soft-capping kernel" in fallbacks[0], fallbacks
    else:
        assert fallbacks == []
    assert_close("o", out, expected, torch.float32)


def test_defaults_and_windows_that_hide_nothing_are_plain_attention():
    """window=None/(-1, -1) and softcap=0 keep plain attention, which every backend runs; so does a
    causal window unbounded on the left, and a right side of 0 is causal."""
    q, k, v = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    name = next(n for n in ("native", "torch") if fastgpt.backends()[n]["available"])
    plain = ops.attention(q, k, v, backend=name)
    assert torch.equal(ops.attention(q, k, v, window=(-1, -1), softcap=0.0, backend=name), plain)
    assert torch.equal(ops.attention(q, k, v, window=(-1, 4), backend=name), plain)
    assert torch.equal(ops.attention(q, k, v, causal=False, window=(-1, 0), backend=name), plain)
    assert torch.equal(ops.attention(q, k, v, causal=False, window=[-1, -1], backend=name), ops.attention(q, k, v, causal=False, backend=name))
    windowed = ops.attention(q, k, v, window=(2, 0), backend="reference")
    assert torch.equal(ops.attention(q, k, v, window=(numpy.int64(2), 0), backend="reference"), windowed)


# ----------------------------------------------------------------------------- torch.compile and opcheck


@pytest.mark.parametrize("backend", backends_declaring("window", "varlen"))
def test_variants_opcheck_and_compile_fullgraph(backend, device):
    skip_unless_runs(backend, device)
    q, k, v = (torch.randn(1, h, 9, 16, device=device, requires_grad=True) for h in (2, 1, 1))
    skip_unless_supports("attention", backend, q, k, v)
    softcap = 2.0 if "softcap" in declared(backend) else 0.0
    torch.library.opcheck(torch.ops.fastgpt.attention.default, (q, k, v, True, 0.25, backend, True, 3, 0, softcap))
    qp, kp, vp = (t[0].transpose(0, 1).detach().requires_grad_() for t in (q, k, v))
    cu = offsets([4, 0, 5], device)
    torch.library.opcheck(
        torch.ops.fastgpt.varlen_attention.default, (qp, kp, vp, cu, cu, None, None, True, 0.25, backend, True, 2, 0, softcap)
    )

    def loss(q, k, v, qp, kp, vp):
        dense_part = ops.attention(q, k, v, window=(3, 0), softcap=softcap, backend=backend).square().sum()
        packed_part = ops.varlen_attention(
            qp, kp, vp, cu, cu, max_seqlen_q=5, max_seqlen_k=5, window=(2, 0), softcap=softcap, backend=backend
        )
        return dense_part + packed_part.square().sum()

    torch._dynamo.reset()  # every backend is a recompile of the same code; stay under the limit
    compiled = torch.compile(loss, fullgraph=True, backend="eager")
    leaves = (q, k, v, qp, kp, vp)
    compiled(*leaves).backward()
    compiled_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    loss(*leaves).backward()
    for name, got, t in zip(("dq", "dk", "dv", "dq packed", "dk packed", "dv packed"), compiled_grads, leaves):
        assert_close(name, got, t.grad, torch.float32)


# ----------------------------------------------------------------------------- bad arguments


def test_bad_variant_arguments_raise_clear_errors():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    for window in ((1,), (1, 2, 3), "ab", (1.5, 0), (True, 0), 3):
        with pytest.raises(TypeError, match="window must be None or a pair of ints"):
            ops.attention(q, k, k, window=window)
    for window in ((-2, 0), (0, -5)):
        with pytest.raises(ValueError, match="window sizes must be >= -1"):
            ops.attention(q, k, k, causal=False, window=window)
    for softcap in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="softcap must be a finite float >= 0"):
            ops.attention(q, k, k, softcap=softcap)
    for softcap in ("1", True, None):
        with pytest.raises(TypeError, match="softcap must be a float"):
            ops.attention(q, k, k, softcap=softcap)


def test_bad_varlen_arguments_raise_clear_errors():
    q, k = torch.randn(6, 4, 8), torch.randn(6, 2, 8)
    cu = offsets([2, 4], "cpu")

    def call(q=q, k=k, v=k, cu_q=cu, cu_k=cu, **kwargs):
        return ops.varlen_attention(q, k, v, cu_q, cu_k, **kwargs)

    call()  # the arguments the cases below spoil are valid
    cases = [
        (TypeError, "cu_seqlens_q must have dtype torch.int32", dict(cu_q=cu.long())),
        (TypeError, "cu_seqlens_k must be a torch.Tensor", dict(cu_k=[0, 2, 6])),
        (ValueError, "cu_seqlens_q must be 1-dimensional", dict(cu_q=cu[None])),
        (ValueError, "cu_seqlens_q must be 1-dimensional", dict(cu_q=cu[:1], cu_k=cu[:1])),
        (ValueError, "cu_seqlens_k must have as many offsets as cu_seqlens_q", dict(cu_k=offsets([2, 2, 2], "cpu"))),
        (ValueError, "cu_seqlens_q must not decrease, got 4 then 2 at index 1", dict(cu_q=torch.tensor([0, 4, 2, 6], dtype=torch.int32), cu_k=offsets([2, 2, 2], "cpu"))),
        (ValueError, "cu_seqlens_k must start at 0", dict(cu_k=torch.tensor([1, 2, 6], dtype=torch.int32))),
        (ValueError, r"cu_seqlens_q must end at the number of rows of q \(6\), got 5", dict(cu_q=offsets([2, 3], "cpu"))),
        (ValueError, r"max_seqlen_q \(3\) is less than the longest sequence in cu_seqlens_q \(4\)", dict(max_seqlen_q=3)),
        (ValueError, "max_seqlen_k must be >= 0", dict(max_seqlen_k=-1)),
        (TypeError, "max_seqlen_q must be None or an int", dict(max_seqlen_q=4.0)),
        (ValueError, "q must be 3-dimensional", dict(q=q[None])),
        (TypeError, "k must have the dtype of q", dict(k=k.half(), v=k.half())),
        (ValueError, "k and v must have the same shape", dict(v=k[:5])),
        (ValueError, "multiple of", dict(k=torch.randn(6, 3, 8), v=torch.randn(6, 3, 8))),
        (ValueError, "window sizes must be >= -1", dict(window=(-3, 0))),
        (ValueError, "softcap must be a finite float >= 0", dict(softcap=-2.0)),
        (ValueError, "backend must be one of", dict(backend="nonsense")),
    ]
    for error, message, kwargs in cases:
        with pytest.raises(error, match=message):
            call(**kwargs)


# ----------------------------------------------------------------------------- the model


def test_model_with_a_sliding_window():
    """A token's logits depend on no token further back than the window reaches through the layers;
    cached generation agrees with the full forward; the field round-trips and old configs load."""
    from fastgpt.nn import GPT, GPTConfig, KVCache

    config = GPTConfig(vocab_size=64, context_length=24, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, sliding_window=3)
    torch.manual_seed(0)
    model = GPT(config, backend="reference").eval()
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 0] = (idx[:, 0] + 1) % 64
    with torch.no_grad():
        logits, _ = model(idx)
        logits_changed, _ = model(changed)
        reach = config.n_layers * (config.sliding_window - 1)  # each layer looks 2 tokens further back
        assert torch.equal(logits[:, reach + 1 :], logits_changed[:, reach + 1 :])
        assert not torch.equal(logits[:, reach], logits_changed[:, reach])
        cache = KVCache(config, 2, "cpu", torch.float32)
        model(idx[:, :10], kv_cache=cache)
        for t in range(10, 16):
            step, _ = model(idx[:, t : t + 1], kv_cache=cache)
            assert_close(f"cached logits at {t}", step[:, 0], logits[:, t], torch.float32)
        torch.manual_seed(0)  # the same weights without the window
        unwindowed, _ = GPT(GPTConfig(**{**config.to_dict(), "sliding_window": None}), backend="reference").eval()(idx)
    assert torch.equal(unwindowed[:, : config.sliding_window], logits[:, : config.sliding_window])
    assert not torch.allclose(unwindowed, logits)
    assert GPTConfig.from_dict(config.to_dict()) == config
    old = {name: value for name, value in config.to_dict().items() if name != "sliding_window"}
    assert GPTConfig.from_dict(old).sliding_window is None
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
            GPTConfig(sliding_window=bad)
