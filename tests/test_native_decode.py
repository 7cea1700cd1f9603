"""The native CPU decode kernel (csrc/cpu/attention_decode.cpp): 1-4 queries per sequence against a
KV cache, GQA groups sharing one pass over K/V, long caches split with a log-sum-exp merge.

The test hook ``torch.ops.fastgpt._set_cpu_decode(route, splits)`` forces the kernel ("always") and
the number of key splits, so both the unsplit and the merged path are checked against float64; bf16
scores run both on AVX512-BF16's dot product (where the CPU has it) and on the portable vector path
(``fastgpt._C._set_force_aten_gemm``)."""

import math

import pytest
import torch

from conftest import assert_close
from attention_oracle import attention_float64

from fastgpt import native

pytestmark = pytest.mark.skipif(not native.available()[0], reason="the native extension is not built")


@pytest.fixture
def decode_route():
    """Set the route/splits for one test; the rule comes back afterwards."""

    def force(route, splits=0):
        torch.ops.fastgpt._set_cpu_decode(route, splits)

    yield force
    torch.ops.fastgpt._set_cpu_decode("rule", 0)


# (dtype, how bf16 is multiplied): only bf16 has a second way
DTYPES_AND_PRODUCTS = [(torch.float32, "vector"), (torch.bfloat16, "bf16 units"), (torch.bfloat16, "vector"),
                       (torch.float16, "vector")]


@pytest.fixture
def bf16_products(request):
    """Both ways the kernel multiplies bf16: the CPU's bf16 dot product and the portable vector code."""
    from fastgpt import _C

    if request.param == "bf16 units" and not _C.build_info()["cpu_bf16_dot"]:
        pytest.skip("this CPU has no AVX512-BF16: the kernel always takes the vector path")
    _C._set_force_aten_gemm(request.param == "vector")
    yield request.param
    _C._set_force_aten_gemm(False)


def cache_views(batch, kv_heads, keys, head_dim, dtype):
    """K and V as views of a longer preallocated (batch, kv_heads, capacity, head_dim) cache."""
    cache = torch.randn(2, batch, kv_heads, keys + 37, head_dim, dtype=dtype)
    return cache[0, :, :, :keys], cache[1, :, :, :keys]


@pytest.mark.parametrize("dtype, bf16_products", DTYPES_AND_PRODUCTS, indirect=["bf16_products"])
@pytest.mark.parametrize("splits", [1, 3, 0])
@pytest.mark.parametrize(
    "batch,heads,kv_heads,queries,keys,head_dim",
    [
        (1, 8, 8, 1, 1000, 64),  # MHA
        (2, 32, 8, 3, 1300, 128),  # GQA group 4, split blocks not a multiple of 16 keys
        (1, 8, 1, 4, 700, 80),  # group 8, a head dim of 5 lane groups
        (2, 4, 1, 2, 65, 130),  # head dim not whole lane groups
        (1, 6, 2, 4, 3, 64),  # fewer keys than queries: the first rows see nothing
        (1, 4, 2, 1, 300, 24),  # bf16: a head dim shorter than one 32-value load
    ],
)
def test_decode_matches_float64(decode_route, poisoned_outputs, bf16_products, dtype, splits, batch, heads, kv_heads,
                                queries, keys, head_dim):
    decode_route("always", splits)
    q = torch.randn(batch, heads, queries, head_dim, dtype=dtype)
    k, v = cache_views(batch, kv_heads, keys, head_dim, dtype)
    scale = head_dim**-0.5
    out, lse = torch.ops.fastgpt.native_attention_forward(q, k, v, True, scale)
    ref_out, ref_lse = attention_float64(q, k, v, True, scale)
    assert_close("out", out, ref_out, dtype)
    seen = torch.isfinite(ref_lse)
    assert (lse[~seen] == -math.inf).all(), "rows that see no key must have lse -inf"
    assert (out.transpose(1, 2)[~seen.transpose(1, 2)] == 0).all(), "rows that see no key must output 0"
    assert_close("lse", lse[seen], ref_lse[seen], torch.float32)


@pytest.mark.parametrize("dtype, bf16_products", DTYPES_AND_PRODUCTS[:3], indirect=["bf16_products"])
@pytest.mark.parametrize("causal", [True, False])
def test_decode_strided_inputs_and_non_causal(decode_route, bf16_products, causal, dtype):
    """Non-unit inner strides (copied per block) and the mask off."""
    decode_route("always", 2)
    wide = torch.randn(1, 600, 4, 2 * 64, dtype=dtype)
    k, v = wide[..., ::2].transpose(1, 2), wide[..., 1::2].transpose(1, 2)
    q = torch.randn(1, 2, 8, 67, dtype=dtype)[..., 1:65].transpose(1, 2)  # (1, 8, 2, 64), seq-major
    out, lse = torch.ops.fastgpt.native_attention_forward(q, k, v, causal, 0.125)
    ref_out, ref_lse = attention_float64(q, k, v, causal, 0.125)
    assert_close("out", out, ref_out, dtype)
    assert_close("lse", lse, ref_lse, torch.float32)


def test_decode_and_tiles_agree(decode_route):
    """The routed kernel and the tiled forward give the same answer where both run."""
    q = torch.randn(2, 12, 4, 64)
    k, v = cache_views(2, 4, 777, 64, torch.float32)
    decode_route("always")
    decoded = torch.ops.fastgpt.native_attention_forward(q, k, v, True, 0.125)
    decode_route("never")
    tiled = torch.ops.fastgpt.native_attention_forward(q, k, v, True, 0.125)
    for name, a, b in zip(("out", "lse"), decoded, tiled):
        assert_close(name, a, b, torch.float32, factor=0.1)


def test_decode_hook_rejects_unknown_route():
    with pytest.raises(RuntimeError, match="route must be"):
        torch.ops.fastgpt._set_cpu_decode("sometimes", 0)
