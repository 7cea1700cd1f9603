"""The Triton attention kernels' tile walk under a sliding window, against the float64 formula:
sequences long enough for several tiles (16 under the interpreter) on both sides of a key block's
(or query block's) unmasked run, which the kernels visit in one masked loop that skips over the
run (tests/test_variants.py keeps to one or two tiles)."""

import math

import pytest
import torch
from attention_oracle import assert_forward_matches, assert_grads_match, attention_float64
from conftest import skip_unless_runs

# (seq_q, seq_k, causal, (left, right), softcap): masked tiles before and after an unmasked run in
# the forward, dQ and dK/dV walks; a cache of keys longer than the queries; a narrow window whose
# run is empty; a soft cap
CASES = [
    (80, 80, True, (40, 0), 0.0),
    (80, 80, False, (20, 25), 2.0),
    (50, 97, False, (45, 30), 0.0),
    (70, 70, True, (5, 0), 0.0),
]


@pytest.mark.parametrize("seq_q,seq_k,causal,window,softcap", CASES, ids=str)
def test_windows_over_many_tiles_match_float64(seq_q, seq_k, causal, window, softcap, device):
    skip_unless_runs("triton", device, torch.float32)
    generator = torch.Generator().manual_seed(seq_q * seq_k)
    q, k, v = (torch.randn(1, heads, seq, 16, generator=generator).to(device)
               for heads, seq in ((4, seq_q), (2, seq_k), (2, seq_k)))
    do = torch.randn(q.shape, generator=generator).to(device)
    scale = 1.0 / math.sqrt(16)
    o, lse = torch.ops.fastgpt.attention(q, k, v, causal, scale, "triton", False, *window, softcap)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    o64, lse64 = attention_float64(q64, k64, v64, causal, scale, window, softcap)
    o64.backward(do.cpu().double())
    assert_forward_matches(o, lse, o64, lse64, q, torch.float32)
    grads = torch.ops.fastgpt.attention_backward(do, q, k, v, o, lse, causal, scale, "triton", *window, softcap)
    assert_grads_match(grads, (q64.grad, k64.grad, v64.grad), (q, k, v), torch.float32)
