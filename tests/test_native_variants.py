"""The native CPU kernels' attention variants (csrc/cpu/attention.cpp) at the sizes the shared suites
do not reach: windows narrower than a tile, so whole key tiles are skipped and only boundary tiles
are masked (forward key blocks of 512, backward blocks of 128, bands of 32 rows); packed sequences
that cross tile boundaries, empty ones, and strided inputs; the decode route with a window. Each is
checked against the float64 formula (tests/attention_oracle.py), forward and backward."""

import math

import pytest
import torch
from attention_oracle import assert_forward_matches, assert_grads_match, attention_float64
from conftest import assert_close

from fastgpt import native

pytestmark = pytest.mark.skipif(not native.available()[0], reason="the native extension is not built")


def dense_qkv(batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype, strided):
    if not strided:
        return (torch.randn(batch, n, s, head_dim, dtype=dtype) for n, s in ((heads, seq_q), (kv_heads, seq_k), (kv_heads, seq_k)))
    # (batch, seq, heads, wider head dim) views, as a model's projections give them
    return (
        torch.randn(batch, s, n, head_dim + 5, dtype=dtype)[..., 2 : head_dim + 2].transpose(1, 2)
        for n, s in ((heads, seq_q), (kv_heads, seq_k), (kv_heads, seq_k))
    )


# (batch, heads, kv_heads, seq_q, seq_k, head_dim, causal, window, softcap)
DENSE_CASES = [
    (1, 2, 1, 300, 300, 32, True, (17, 0), 0.0),  # most key tiles of every query block skipped
    (1, 2, 2, 300, 300, 32, False, (17, 5), 0.0),  # both sides bounded
    (2, 4, 2, 700, 1100, 16, True, (130, 0), 2.0),  # a chunk against a cache, past the 512-key forward block
    (1, 2, 1, 1100, 400, 16, False, (40, -1), 0.0),  # more queries than keys: leading rows see nothing
    (1, 2, 2, 260, 260, 16, False, (-1, 3), 1.5),  # left unbounded, a strong cap
    (1, 2, 1, 600, 600, 16, True, (0, 0), 0.0),  # each query sees itself
    (1, 2, 1, 530, 530, 16, True, (1000, 0), 0.0),  # wider than the sequence: full causal
    (1, 2, 2, 200, 200, 16, True, None, 3.0),  # soft cap alone
]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "b{}h{}kv{}q{}k{}d{}{}w{}s{}".format(*c).replace(" ", ""))
def test_dense_variants_match_float64(case, dtype, strided, poisoned_outputs):
    batch, heads, kv_heads, seq_q, seq_k, head_dim, causal, window, softcap = case
    q, k, v = dense_qkv(batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype, strided)
    left, right = window if window is not None else (-1, -1)
    scale = head_dim**-0.5
    o, lse = torch.ops.fastgpt.native_attention_variants_forward(q, k, v, causal, scale, left, right, softcap)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, lse64 = attention_float64(q64, k64, v64, causal, scale, window, softcap)
    seen = assert_forward_matches(o, lse, o64, lse64, q, dtype)
    assert (o[~seen] == 0).all(), "a row that sees no key outputs zeros"
    do = torch.randn(q.shape, dtype=dtype)
    o64.backward(do.double())
    grads = torch.ops.fastgpt.native_attention_variants_backward(do, q, k, v, o, lse, causal, scale, left, right, softcap)
    assert_grads_match(grads, (q64.grad, k64.grad, v64.grad), (q, k, v), dtype)


@pytest.mark.parametrize("route", ["always", "never"])
@pytest.mark.parametrize("queries", [1, 4])
def test_few_queries_with_variants_skip_the_decode_kernel(route, queries):
    """The decode kernel has no window or cap: the tiled kernel runs them whatever the route."""
    q, k, v = dense_qkv(1, 8, 2, queries, 900, 64, torch.float32, strided=False)
    torch.ops.fastgpt._set_cpu_decode(route, 0)
    try:
        o, lse = torch.ops.fastgpt.native_attention_variants_forward(q, k, v, True, 0.125, 100, 0, 4.0)
    finally:
        torch.ops.fastgpt._set_cpu_decode("rule", 0)
    o64, lse64 = attention_float64(q, k, v, True, 0.125, (100, 0), 4.0)
    assert_forward_matches(o, lse, o64, lse64, q, torch.float32)


def offsets(lengths):
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)


def packed(lengths, heads, head_dim, dtype, strided):
    wide = torch.randn(sum(lengths), heads, head_dim + 3, dtype=dtype)
    return wide[..., 1 : head_dim + 1] if strided else wide[..., :head_dim].contiguous()


# (query lengths, key lengths, causal, window, softcap)
VARLEN_CASES = [
    ([130, 0, 600, 1, 257], [130, 0, 600, 1, 257], True, None, 0.0),  # across the 128-row tiles, empty and single
    ([130, 0, 600, 1, 257], [130, 0, 600, 1, 257], True, (50, 0), 2.0),
    ([3, 200, 0, 700], [140, 200, 9, 520], False, (20, 7), 0.0),  # chunks against caches; a sequence without queries
    ([300, 5], [0, 600], False, None, 1.0),  # a sequence without keys: zeros, -inf
]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"q{c[0]}k{c[1]}{'c' if c[2] else ''}w{c[3]}s{c[4]}".replace(" ", ""))
def test_varlen_matches_each_sequence_alone(case, dtype, strided, poisoned_outputs):
    lengths_q, lengths_k, causal, window, softcap = case
    heads, kv_heads, head_dim, scale = 4, 2, 16, 0.3
    q = packed(lengths_q, heads, head_dim, dtype, strided)
    k, v = (packed(lengths_k, kv_heads, head_dim, dtype, strided) for _ in range(2))
    cu_q, cu_k = offsets(lengths_q), offsets(lengths_k)
    left, right = window if window is not None else (-1, -1)
    o, lse = torch.ops.fastgpt.native_varlen_attention_forward(q, k, v, cu_q, cu_k, causal, scale, left, right, softcap)
    assert o.shape == q.shape and o.is_contiguous() and lse.shape == (heads, q.shape[0])
    do = torch.randn(q.shape, dtype=dtype)
    dq, dk, dv = torch.ops.fastgpt.native_varlen_attention_backward(
        do, q, k, v, o, lse, cu_q, cu_k, causal, scale, left, right, softcap
    )
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(lengths_q)):
        rows_q, rows_k = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        q64, k64, v64 = (t[rows].transpose(0, 1).unsqueeze(0).double().requires_grad_() for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k)))
        if lengths_q[b] == 0:
            assert (dk[rows_k] == 0).all() and (dv[rows_k] == 0).all(), "keys no query sees get zero gradient"
            continue
        if lengths_k[b] == 0:
            assert (o[rows_q] == 0).all() and (lse[:, rows_q] == -math.inf).all() and (dq[rows_q] == 0).all()
            continue
        o64, lse64 = attention_float64(q64, k64, v64, causal, scale, window, softcap)
        o64.backward(do[rows_q].transpose(0, 1).unsqueeze(0).double())
        where = f"sequence {b}"
        assert_close(f"o ({where})", o[rows_q], o64[0].transpose(0, 1), dtype)
        seen = torch.isfinite(lse64[0])
        assert torch.equal(torch.isfinite(lse[:, rows_q]), seen)
        assert_close(f"lse ({where})", lse[:, rows_q][seen], lse64[0][seen], dtype)
        for name, grad, t64, rows in (("dq", dq, q64, rows_q), ("dk", dk, k64, rows_k), ("dv", dv, v64, rows_k)):
            assert_close(f"{name} ({where})", grad[rows], t64.grad[0].transpose(0, 1), dtype, factor=2.0)


def test_varlen_without_rows():
    """Every sequence empty: nothing to compute, outputs of zero rows."""
    q, k, v = (torch.randn(0, 2, 16) for _ in range(3))
    cu = offsets([0, 0])
    o, lse = torch.ops.fastgpt.native_varlen_attention_forward(q, k, v, cu, cu, True, 0.25, -1, -1, 0.0)
    assert o.shape == (0, 2, 16) and lse.shape == (2, 0)
    grads = torch.ops.fastgpt.native_varlen_attention_backward(o, q, k, v, o, lse, cu, cu, True, 0.25, -1, -1, 0.0)
    assert [g.shape for g in grads] == [q.shape] * 3


def test_bad_offsets_are_refused():
    q = torch.randn(5, 2, 16)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        torch.ops.fastgpt.native_varlen_attention_forward(q, q, q, offsets([2, 2]), offsets([2, 3]), True, 0.25, -1, -1, 0.0)
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.fastgpt.native_varlen_attention_forward(q, q, q, offsets([5]).long(), offsets([5]), True, 0.25, -1, -1, 0.0)


def test_variant_ops_opcheck():
    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    args = (q, k, v, True, 0.25, 3, 0, 2.0)
    torch.library.opcheck(torch.ops.fastgpt.native_attention_variants_forward.default, args)
    o, lse = torch.ops.fastgpt.native_attention_variants_forward(*args)
    torch.library.opcheck(torch.ops.fastgpt.native_attention_variants_backward.default, (torch.randn_like(o), q, k, v, o, lse, *args[3:]))
    qp, kp, vp = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    cu = offsets([4, 0, 5])
    varlen_args = (qp, kp, vp, cu, cu, False, 0.25, 2, 1, 0.0)
    torch.library.opcheck(torch.ops.fastgpt.native_varlen_attention_forward.default, varlen_args)
    o, lse = torch.ops.fastgpt.native_varlen_attention_forward(*varlen_args)
    torch.library.opcheck(
        torch.ops.fastgpt.native_varlen_attention_backward.default, (torch.randn_like(o), qp, kp, vp, o, lse, cu, cu, *varlen_args[5:])
    )


def test_variants_off_the_cpu_are_declined_with_a_reason(monkeypatch):
    """The registry declares native's variants, but its kernels for them are CPU only: on another
    device the variant check says so (auto passes native by, backend="native" raises BackendError)."""
    from fastgpt import dispatch

    q = torch.empty(1, 2, 4, 16, device="meta")  # stands in for a CUDA tensor: no GPU needed
    monkeypatch.setattr(native, "attention_unsupported", lambda q, k, v: None)  # as if native ran plain calls there
    reason = dispatch.unsupported_reason("attention", "native", (q, q, q), frozenset({"window", "softcap"}))
    assert reason == "the native backend has no sliding-window or soft-capping kernel on meta (its variant kernels are CPU only)"
    assert dispatch.unsupported_reason("attention", "native", (q, q, q)) is None
    cpu = torch.empty(1, 2, 4, 16)
    assert native.attention_variants_unsupported(cpu, cpu, cpu, frozenset({"varlen"})) is None


def test_auto_ignores_the_table_for_variant_calls(monkeypatch):
    """auto's tables time plain calls; where one names torch, a windowed call still takes the
    registry's order (torch's window is a full mask: 9-13x slower than native's at 4k tokens)."""
    from fastgpt import auto_rule, dispatch

    monkeypatch.setattr(auto_rule, "preferred_backend", lambda op, args, training: "torch")
    q = torch.randn(1, 2, 8, 16)
    assert dispatch.auto_choice("attention", (q, q, q), True) == "torch"
    assert dispatch.auto_choice("attention", (q, q, q), True, variants={"window"}) == "native"
