"""The Triton forward's masked tiles along the causal diagonal, against the float64 formula.

In 16-bit the forward runs the unmasked key tiles in one loop and the tiles the diagonal crosses as
straight-line steps before it (kernels/attention_forward.py, ``forward_visible_tiles``): at most
``cdiv(BLOCK_M + BLOCK_N - 2, PEEL_N)`` of them, the last needed only for some alignments of
``seq_k - seq_q`` to the tile (16 under the interpreter). The cases sweep that offset through
aligned, unaligned and negative values (fewer keys than queries: the first rows see nothing), the
decode kernel's packed GQA rows and packed sequences, with fp16 inputs (bf16 dots are not reliable
in the interpreter). Skipping the last causal step fails 9 of them, the non-causal ragged end more."""

import math

import pytest
import torch
from attention_oracle import assert_forward_matches, attention_float64
from conftest import skip_unless_runs

from fastgpt.kernels import attention as triton_attention

HEAD_DIM = 16
SCALE = 1.0 / math.sqrt(HEAD_DIM)

# (seq_q, seq_k): offsets seq_k - seq_q from -12 to 30
OFFSETS = [(33, 47), (33, 63), (40, 40), (40, 41), (40, 55), (45, 33), (20, 13), (17, 17)]
# decode (at most 4 queries): the GQA group's rows share one tile
DECODE = [(1, 37), (3, 50), (4, 30), (4, 46), (2, 8)]


def random_inputs(seq_q, seq_k, heads, kv_heads, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, seq, HEAD_DIM, generator=generator, dtype=torch.float16)
            for h, seq in ((heads, seq_q), (kv_heads, seq_k), (kv_heads, seq_k))]


@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("seq_q,seq_k", OFFSETS + DECODE, ids=str)
def test_causal_diagonal_at_every_offset_matches_float64(seq_q, seq_k, softcap):
    skip_unless_runs("triton", "cpu", torch.float16)
    q, k, v = random_inputs(seq_q, seq_k, 8, 2, seq_q * 1000 + seq_k)
    o, lse = triton_attention.attention_forward(q, k, v, True, SCALE, softcap=softcap)
    o64, lse64 = attention_float64(q, k, v, True, SCALE, None, softcap)
    assert_forward_matches(o, lse, o64, lse64, q, torch.float16)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_sequences_with_unaligned_offsets_match_float64(causal):
    skip_unless_runs("triton", "cpu", torch.float16)
    lengths_q, lengths_k = [5, 40, 17], [29, 33, 50]  # offsets 24, -7, 33
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(sum(lengths_q), 4, HEAD_DIM, generator=generator, dtype=torch.float16)
    k, v = (torch.randn(sum(lengths_k), 2, HEAD_DIM, generator=generator, dtype=torch.float16) for _ in range(2))
    offsets_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    offsets_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    o, lse = triton_attention.varlen_attention_forward(q, k, v, offsets_q, offsets_k, max(lengths_q),
                                                       max(lengths_k), causal, SCALE)
    for i in range(len(lengths_q)):
        rows, keys = slice(offsets_q[i], offsets_q[i + 1]), slice(offsets_k[i], offsets_k[i + 1])
        qi, ki, vi = (t[span].transpose(0, 1).unsqueeze(0) for t, span in ((q, rows), (k, keys), (v, keys)))
        o64, lse64 = attention_float64(qi, ki, vi, causal, SCALE)
        assert_forward_matches(o[rows].transpose(0, 1).unsqueeze(0).contiguous(),
                               lse[:, rows].unsqueeze(0).contiguous(), o64, lse64, qi, torch.float16)
