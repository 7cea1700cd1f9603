"""Property tests: random small inputs through every registered backend that accepts them, against
float64 oracles written here (not the reference backend, which is itself under test).

Hypothesis draws the shapes (odd sizes, GQA groups, seq_q != seq_k), the dtype (float32, float16,
float64 where a backend takes it), a layout per tensor (contiguous, transposed, sliced, stride 0 by
``expand``, rows overlapping in memory) and, in some examples, one NaN or ±inf planted in one input.
Outputs must match the oracle where it is finite, and be NaN / ±inf exactly where it is.
The examples are derandomized so a failure reproduces in CI; hypothesis prints the failing draw.
"""

import math
from typing import Callable, NamedTuple

import pytest
import torch
from conftest import BACKENDS, TOLERANCE, skip_unless_runs, skip_unless_supports
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastgpt import dispatch, ops
from fastgpt.contract import residual_stream_dtype

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
MIN_EXAMPLES = 20  # a backend that declined most draws would pass without being tested
DTYPES = (torch.float32, torch.float16, torch.float64)
TOLERANCES = {**TOLERANCE, torch.float64: 1e-10}
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "overlapping")
SPECIALS = (math.nan, math.inf, -math.inf)


def dtypes_taken(op, backend, make):
    """The dtypes of DTYPES that ``backend`` takes for ``op`` (asked with inputs made by ``make(dtype)``)."""
    return [dtype for dtype in DTYPES if dispatch.unsupported_reason(op, backend, make(dtype)) is None]


def laid_out(data, values, name, layouts=LAYOUTS):
    """``values`` (contiguous) stored with a drawn layout: the same values for contiguous, transposed
    and sliced; for expanded (stride 0 along a drawn dimension) and overlapping (consecutive rows one
    element apart in one buffer) the values the layout gives, drawn from ``values``."""
    layout = data.draw(st.sampled_from(layouts), label=f"{name} layout")
    if layout == "contiguous":
        return values
    if layout == "transposed":  # the last two dimensions stored swapped
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # every other element of a buffer twice as wide
        wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "expanded":
        dim = data.draw(st.integers(0, values.dim() - 1), label=f"{name} expanded dim")
        return values.narrow(dim, 0, 1).expand(values.shape)
    strides = [1] * values.dim()  # overlapping: rows one element apart, earlier dimensions packed
    for i in range(values.dim() - 3, -1, -1):
        strides[i] = strides[i + 1] * values.shape[i + 1]
    size = sum((n - 1) * stride for n, stride in zip(values.shape, strides)) + 1
    return values.reshape(-1)[:size].clone().as_strided(values.shape, strides)


def plant(data, t, name):
    """Write one NaN or ±inf into ``t``'s storage at a drawn index (its aliases change with it)."""
    index = [data.draw(st.integers(0, n - 1), label=f"{name} special index") for n in t.shape]
    value = data.draw(st.sampled_from(SPECIALS), label=f"{name} special value")
    offset = t.storage_offset() + sum(i * stride for i, stride in zip(index, t.stride()))
    t.as_strided((1,), (1,), offset).fill_(value)


def compare(name, got, expected, dtype, amplification=1.0):
    """``got`` is NaN / +inf / -inf exactly where ``expected`` (float64) is, and close elsewhere:
    within the dtype's tolerance times ``amplification`` (how much the formula magnifies the
    rounding of its inputs) times the result's scale."""
    got = got.detach().double()
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    for label, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        mismatch = where(got) != where(expected)
        assert not mismatch.any(), f"{name}: {label} at {mismatch.nonzero()[:4].tolist()} differs from the oracle"
    finite = expected.isfinite()
    err = (got[finite] - expected[finite]).norm().item()
    scale = expected[finite].norm().item()
    assert err <= TOLERANCES[dtype] * amplification * max(scale, 1.0), f"{name}: error {err:.3g} (scale {scale:.3g})"


# ----------------------------------------------------------------------------- attention


def seen_keys(seq_q, seq_k, causal):
    """(seq_q, seq_k): whether query i sees key j (causal: aligned bottom-right)."""
    seen = torch.ones(seq_q, seq_k, dtype=torch.bool)
    return seen.tril(seq_k - seq_q) if causal else seen


def special_v_with_a_blind_row(q, k, v, causal):
    """A NaN or inf in v while some query sees no key (causal with seq_q > seq_k)."""
    return causal and q.shape[-2] > k.shape[-2] and not bool(v.isfinite().all())


def special_q_or_k(q, k, v, causal):
    return not (q.isfinite().all() and k.isfinite().all())


class Difference(NamedTuple):
    """A way a backend differs from the oracle: for which op, the inputs where it does (a condition
    on the op's keyword arguments), why, and one example of them."""

    op: str
    condition: Callable  # (**inputs) -> bool
    reason: str
    example: Callable  # () -> inputs


def _example_blind_row():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 3, 4, generator=g)
    k, v = torch.randn(1, 1, 2, 4, generator=g), torch.randn(1, 1, 2, 4, generator=g)
    v[0, 0, 1, 0] = math.nan  # query 0 sees no key: its row is zeros whatever v holds
    return dict(q=q, k=k, v=v, causal=True)


def _example_transposed_v():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 3, generator=g)
    k, v = torch.randn(1, 1, 2, 3, generator=g), torch.randn(1, 1, 2, 3, generator=g)
    return dict(q=q, k=k, v=v.transpose(-1, -2).contiguous().transpose(-1, -2), causal=False)


def _example_special_q(value):
    def example():
        g = torch.Generator().manual_seed(0)
        q, v = torch.randn(1, 1, 3, 1, generator=g), torch.randn(1, 1, 3, 1, generator=g)
        k = torch.rand(1, 1, 3, 1, generator=g) + 0.5
        q[0, 0, 2] = value  # every score of query 2 is value · (a positive k) = value
        return dict(q=q, k=k, v=v, causal=False)

    return example


BLIND_ROW = Difference(
    "attention",
    special_v_with_a_blind_row,
    "a row that sees no key is NaN, not the zeros of the contract, when v holds a NaN or inf anywhere "
    "(its zero probabilities are multiplied by v)",
    _example_blind_row,
)
NAN_SCORES = Difference(
    "attention",
    special_q_or_k,
    "a row whose scores are NaN (a NaN in q or k) is zeros, not NaN",
    _example_special_q(math.nan),
)
MINUS_INF_SCORES = Difference(
    "attention",
    special_q_or_k,
    "a row whose scores are all -inf (an inf in q or k) is zeros, as if it saw no key, not the textbook "
    "NaN (exp(-inf - -inf))",
    _example_special_q(-math.inf),
)

def _example_half_sum():
    g = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(4, 64, generator=g).half() for _ in range(2))
    return dict(x=x, residual=residual, weight=None, bias=None, residual_in_fp32=True)



# examples meeting a backend's conditions are left out of the fuzz; test_known_differences_remain
# shows each one (a strict xfail: when a backend is fixed, it fails until its entry here goes)
KNOWN_DIFFERENCES = {
    "triton": [BLIND_ROW, MINUS_INF_SCORES],
    "torch": [NAN_SCORES, MINUS_INF_SCORES],
}


def known(backend, op, **inputs):
    """Whether these inputs meet a known difference of ``backend`` for ``op``."""
    return any(d.condition(**inputs) for d in KNOWN_DIFFERENCES.get(backend, ()) if d.op == op)


@pytest.mark.parametrize(
    "backend, difference",
    [pytest.param(backend, d, marks=pytest.mark.xfail(strict=True, reason=d.reason), id=f"{backend}-{n}")
     for backend, differences in KNOWN_DIFFERENCES.items() for n, d in enumerate(differences)],
)
def test_known_differences_remain(backend, difference):
    skip_unless_runs(backend, "cpu")
    inputs = difference.example()
    assert difference.condition(**inputs)
    check_example(backend, difference.op, inputs)


# differences the fuzz found and that were fixed (the torch backend's): every backend must pass
FIXED_EXAMPLES = {"transposed-v": ("attention", _example_transposed_v), "fp32-residual-of-halves": ("add_layer_norm", _example_half_sum)}


@pytest.mark.parametrize("example", FIXED_EXAMPLES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_differences_stay_fixed(backend, example):
    skip_unless_runs(backend, "cpu")
    op, make = FIXED_EXAMPLES[example]
    inputs = make()
    if op == "attention":
        skip_unless_supports(op, backend, inputs["q"], inputs["k"], inputs["v"])
    else:
        skip_unless_supports(op, backend, inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"])
    check_example(backend, op, inputs)


def check_example(backend, op, inputs):
    """``backend`` against the oracle on one example's inputs."""
    if op == "attention":
        q, k, v, causal = inputs["q"], inputs["k"], inputs["v"], inputs["causal"]
        expected = oracle_attention(q, k, v, causal, 1 / math.sqrt(q.shape[-1]))
        compare(f"{backend} attention", ops.attention(q, k, v, causal=causal, backend=backend), expected, q.dtype)
    else:
        x, fp32 = inputs["x"], inputs["residual_in_fp32"]
        h_dtype = residual_stream_dtype(x.dtype, fp32)
        _, expected_h = oracle_add_layer_norm(x, inputs["residual"], inputs["weight"], inputs["bias"], 1e-5, h_dtype)
        _, h = ops.add_layer_norm(x, inputs["residual"], inputs["weight"], inputs["bias"], residual_in_fp32=fp32,
                                  backend=backend)
        compare(f"{backend} add_layer_norm h", h, expected_h, h_dtype)


def oracle_attention(q, k, v, causal, scale):
    """The textbook softmax(q kᵀ · scale) v in float64, as tests/test_special_values.py writes it: the
    scores of keys a query does not see (bottom-right causal mask) are -inf whatever q and k hold,
    the product with v runs over every key (so 0 · NaN = NaN); a row that sees no key is zeros."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    seen = seen_keys(q.shape[-2], k.shape[-2], causal)
    scores = (q @ k.transpose(-2, -1)) * scale
    top = scores.masked_fill(~seen, -math.inf).amax(-1, keepdim=True)
    weights = torch.where(seen, torch.exp(scores - top), 0.0)
    out = (weights / weights.sum(-1, keepdim=True)) @ v
    return torch.where(seen.any(-1)[:, None], out, 0.0)


def _attention_probe(dtype):
    q = torch.zeros(1, 1, 2, 8, dtype=dtype)
    return q, q, q


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_matches_the_oracle(backend):
    skip_unless_runs(backend, "cpu")
    dtypes = dtypes_taken("attention", backend, _attention_probe)
    if not dtypes:
        pytest.skip(f"{backend} takes none of {DTYPES} on the CPU")

    ran = []

    @FUZZ
    @given(data=st.data())
    def check(data):
        dtype = data.draw(st.sampled_from(dtypes), label="dtype")
        batch, kv_heads, group = data.draw(st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 3)))
        seq_q, seq_k = data.draw(st.integers(1, 9), label="seq_q"), data.draw(st.integers(1, 9), label="seq_k")
        head_dim = data.draw(st.sampled_from([1, 3, 8, 13, 32]), label="head_dim")
        causal = data.draw(st.booleans(), label="causal")
        generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
        tensors = {}
        for name, heads, seq in (("q", kv_heads * group, seq_q), ("k", kv_heads, seq_k), ("v", kv_heads, seq_k)):
            values = torch.randn(batch, heads, seq, head_dim, generator=generator).to(dtype)
            tensors[name] = laid_out(data, values, name)
        special = data.draw(st.sampled_from([None, "q", "k", "v"]), label="special value in")
        if special is not None:
            plant(data, tensors[special], special)
        q, k, v = tensors["q"], tensors["k"], tensors["v"]
        assume(dispatch.unsupported_reason("attention", backend, (q, k, v)) is None)
        assume(not known(backend, "attention", q=q, k=k, v=v, causal=causal))
        scale = 1 / math.sqrt(head_dim)
        expected = oracle_attention(q, k, v, causal, scale)
        compare(f"{backend} attention", ops.attention(q, k, v, causal=causal, backend=backend), expected, dtype)
        ran.append(dtype)

    check()
    assert len(ran) >= MIN_EXAMPLES, f"only {len(ran)} examples ran on {backend}"


# ----------------------------------------------------------------------------- add + LayerNorm


def oracle_add_layer_norm(x, residual, weight, bias, eps, h_dtype):
    """h = x + residual (stored in ``h_dtype``, as the contract keeps it); y = LayerNorm(h), in float64."""
    h = (x.double() + residual.double()).to(h_dtype).double()
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    y = (h - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y, h


def layer_norm_amplification(h, eps=1e-5):
    """How much LayerNorm magnifies the rounding of a row's mean: |mean| / sqrt(var + eps), at least 1.
    A row of equal values (an expanded x) has var 0, so a rounding of 1e-7 in its mean comes out
    as 1e-7 / sqrt(eps) ≈ 3e-5 in y, in any correct fp32 kernel."""
    h = h.double()
    ratio = h.mean(-1).abs() / torch.sqrt(h.var(-1, unbiased=False) + eps)
    ratio = ratio[ratio.isfinite()]
    return max(1.0, ratio.max().item()) if ratio.numel() else 1.0


def _layer_norm_probe(dtype):
    x = torch.zeros(2, 8, dtype=dtype)
    return x, x, None, None


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_layer_norm_matches_the_oracle(backend):
    skip_unless_runs(backend, "cpu")
    dtypes = dtypes_taken("add_layer_norm", backend, _layer_norm_probe)
    if not dtypes:
        pytest.skip(f"{backend} takes none of {DTYPES} on the CPU")

    ran = []

    @FUZZ
    @given(data=st.data())
    def check(data):
        dtype = data.draw(st.sampled_from(dtypes), label="dtype")
        rows = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=2), label="leading dims")
        hidden = data.draw(st.sampled_from([1, 2, 7, 33, 64, 130]), label="hidden")
        generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
        residual_dtype = data.draw(st.sampled_from([dtype, torch.float32]), label="residual dtype")
        residual_in_fp32 = data.draw(st.booleans(), label="residual_in_fp32")
        # a second leading dimension makes x 3-D, so the overlapping layout overlaps whole rows too
        inputs = {
            "x": laid_out(data, torch.randn(*rows, hidden, generator=generator).to(dtype), "x"),
            "residual": laid_out(data, torch.randn(*rows, hidden, generator=generator).to(residual_dtype), "residual"),
        }
        for name in ("weight", "bias"):
            param_dtype = data.draw(st.sampled_from([None, dtype, torch.float32]), label=f"{name} dtype")
            if param_dtype is not None:
                values = torch.randn(hidden, generator=generator).to(param_dtype)
                inputs[name] = laid_out(data, values, name, ("contiguous", "sliced", "expanded"))
        special = data.draw(st.sampled_from([None, *inputs]), label="special value in")
        if special is not None:
            plant(data, inputs[special], special)
        x, residual, weight, bias = inputs["x"], inputs["residual"], inputs.get("weight"), inputs.get("bias")
        assume(dispatch.unsupported_reason("add_layer_norm", backend, (x, residual, weight, bias)) is None)
        assume(not known(backend, "add_layer_norm", x=x, residual=residual, weight=weight, bias=bias,
                         residual_in_fp32=residual_in_fp32))
        h_dtype = residual_stream_dtype(x.dtype, residual_in_fp32)
        expected_y, expected_h = oracle_add_layer_norm(x, residual, weight, bias, 1e-5, h_dtype)
        y, h = ops.add_layer_norm(x, residual, weight, bias, 1e-5, residual_in_fp32=residual_in_fp32, backend=backend)
        assert h.dtype == h_dtype and y.dtype == x.dtype
        compare(f"{backend} add_layer_norm h", h, expected_h, h_dtype)
        compare(f"{backend} add_layer_norm y", y, expected_y, dtype, layer_norm_amplification(expected_h))
        ran.append(dtype)

    check()
    assert len(ran) >= MIN_EXAMPLES, f"only {len(ran)} examples ran on {backend}"
