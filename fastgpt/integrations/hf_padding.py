"""Padded batches of Hugging Face models on ``fastgpt.ops.varlen_attention``.

transformers hands an attention layer of a padded batch a 4-d mask ``(batch, 1, seq_q, seq_k)``,
boolean (True: the query sees the key) or additive float (0 or the dtype's minimum). ``plan`` reads
from the mask, for each sequence ``b``, the span of keys it holds, ``[start_b, end_b)``, and the one
causal diagonal ``d`` of the batch, then rebuilds the mask those numbers describe,

    query q sees key k  <=>  start_b <= k < end_b  and  k <= q + d  (and  k >= q + d - left  with a window),

and compares it with the mask given: equal, the call runs on fastgpt; anything else (packed
sequences, chunked or bidirectional patterns, a window that is not the one in the kwargs) gets None
and goes to transformers' SDPA. The comparison proves the equivalence whatever the derivation got
wrong, and costs a few passes over the mask's ``batch × seq_q × seq_k`` entries, against attention's
``heads × head_dim`` times more work.

In those terms each sequence's query rows are of three kinds: rows with ``q + d < start_b`` see no
key (zeros, as torch's SDPA returns for a boolean mask's fully masked row: left padding); rows with
``start_b <= q + d < end_b`` see keys ``start_b .. q + d``, which is ``varlen_attention``'s causal
mask aligned bottom-right on the sequence's key span; rows with ``q + d >= end_b`` (right padding)
see the whole span, a second, non-causal ``varlen_attention`` call.
"""

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from fastgpt import ops


@dataclass
class PaddingPlan:
    """How one padded call runs: dense (every sequence the same key span and no row outside the
    causal band: ``ops.attention`` on keys ``dense_keys``), one query per sequence (a decode step:
    ``ops.attention`` per sequence on its keys ``decode_keys[b]`` in place, None for a row that sees
    none), or packed (``varlen_attention`` on the gathered rows). Index tensors are
    ``(sequence, position)`` pairs, in sequence order."""

    window: Optional[tuple]  # (left, 0), or None where the window hides no key
    dense_keys: Optional[slice] = None
    decode_keys: Optional[list] = None
    causal_rows: tuple = ()  # (batch index, query index) of rows in the causal band
    key_rows: tuple = ()  # (batch index, key index) of every sequence's key span
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    past_end_rows: tuple = ()  # (batch index, query index) of rows that see their whole key span
    cu_seqlens_past_end: Optional[torch.Tensor] = None
    max_seqlen_past_end: int = 0


def plan(mask, batch, seq_q, seq_k, window_left):
    """The ``PaddingPlan`` for a 4-d ``mask`` that is exactly causal + key padding (+ the sliding
    window ``window_left`` when not None), or None for any other mask.

    A model hands the same mask tensor to every layer: the plan is kept for it (while it lives and
    is not written to), so the mask is read once per forward."""
    key = (id(mask), batch, seq_q, seq_k, window_left)
    version = _version(mask)
    kept = _plans.get(key)
    if kept is not None and kept[0]() is mask and version is not None and kept[1] == version:
        return kept[2]
    new = _read(mask, batch, seq_q, seq_k, window_left)
    if version is not None:
        if len(_plans) >= _PLANS_KEPT:
            _plans.clear()
        _plans[key] = (weakref.ref(mask), version, new)
    return new


_plans = {}  # (id of the mask, shapes, window) -> (weak reference to it, its version, its plan)
_PLANS_KEPT = 16  # a forward's masks (full and sliding layers): a few


def _version(mask):
    try:
        return mask._version
    except RuntimeError:  # an inference-mode tensor has no version counter: never kept
        return None


def _read(mask, batch, seq_q, seq_k, window_left):
    allowed = _allowed_entries(mask, batch, seq_q, seq_k)
    if allowed is None:
        return None
    # What the numbers are read from matters for speed only: the comparison below decides. Without a
    # window the last query row sees each sequence's whole span (keys past it no row sees); with
    # one, the span is the keys any row sees (a full pass over the mask).
    seen = allowed[:, -1] if window_left is None or seq_q == 1 else allowed.any(dim=1)  # (batch, seq_k)
    count = seen.sum(dim=1)
    if not count.any():  # no query sees any key: rows of zeros, as SDPA gives; nothing to run
        return None
    start = seen.to(torch.uint8).argmax(dim=1)  # the first key seen (0 when none)
    end = start + count  # the span is contiguous: the comparison proves it
    d = _causal_edge(allowed, start, end)
    keys, rows = torch.arange(seq_k, device=mask.device), torch.arange(seq_q, device=mask.device)[:, None]
    band = keys <= rows + d
    if window_left is not None:
        band &= keys >= rows + (d - window_left)
    if not torch.equal((keys >= start[:, None, None]) & (keys < end[:, None, None]) & band, allowed):
        return None
    starts, ends = start.tolist(), end.tolist()
    if mask.dtype != torch.bool and any(s - d > 0 or s == e for s, e in zip(starts, ends)):
        # a float mask's fully masked row is the kernel's choice in SDPA (fp32 CPU averages every
        # value), not zeros: those calls stay on SDPA
        return None
    return _plan_rows(starts, ends, d, seq_q, seq_k, window_left, mask.device)


def _causal_edge(allowed, start, end):
    """The diagonal d of "query q sees keys up to q + d": a causal mask's first row to see a
    sequence's last key ``end - 1`` is ``end - 1 - d``. Where every sequence's first row already
    sees it, every d >= max(end) - 1 describes the same causal mask (a window may not: the
    comparison then refuses it)."""
    last_key = (end - 1).clamp(min=0)
    column = allowed[torch.arange(allowed.shape[0], device=allowed.device), :, last_key]  # (batch, seq_q)
    first_row = column.to(torch.uint8).argmax(dim=1)
    telling = (end > start) & (first_row > 0)
    if telling.any():
        return int((last_key - first_row)[telling].max())
    return int(end.max()) - 1


def _allowed_entries(mask, batch, seq_q, seq_k):
    """``(batch, seq_q, seq_k)`` booleans of a mask that SDPA reads as "sees / does not see", or None."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or mask.shape[2] != seq_q:
        return None
    if mask.shape[3] < seq_k or mask.requires_grad:
        return None
    mask = mask[:, 0, :, :seq_k].expand(batch, seq_q, seq_k)  # transformers 4.53's SDPA cuts a longer mask
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return None
    allowed = mask == 0
    # every other entry must add the dtype's minimum (or -inf): the score then weighs exactly 0
    if not torch.all(allowed | (mask <= torch.finfo(mask.dtype).min)):
        return None
    return allowed


def _plan_rows(starts, ends, d, seq_q, seq_k, window_left, device):
    spans = list(zip(starts, ends))
    first_causal = [min(max(s - d, 0), seq_q) for s, _ in spans]
    # past the causal band: rows whose q + d >= end (the band's last row has q + d = end - 1)
    past_causal = [min(max(e - d, 0), seq_q) if e > s else f for (s, e), f in zip(spans, first_causal)]
    past_end = [seq_q - p if e > s else 0 for (s, e), p in zip(spans, past_causal)]
    window = None
    if window_left is not None:
        # rows past a span's end see keys max(start, q + d - left) .. end - 1: not one of varlen's masks
        if any(n and seq_q - 1 + d - window_left > s for (s, _), n in zip(spans, past_end)):
            return None
        # the band's last row (q + d = end - 1) loses the most keys to the window
        if any(p > f and e - 1 - window_left > s for (s, e), f, p in zip(spans, first_causal, past_causal)):
            window = (window_left, 0)
    if len(set(spans)) == 1 and first_causal[0] == 0 and past_causal[0] == seq_q:
        return PaddingPlan(window=window, dense_keys=slice(starts[0], ends[0]))
    if seq_q == 1:
        # gathering a decode step's keys would copy the whole cache, more bytes than its attention
        # reads: each sequence's keys are used in place instead (its one query sees all of them)
        sees = [f == 0 and e > s for (s, e), f in zip(spans, first_causal)]
        return PaddingPlan(window=window, decode_keys=[slice(s, e) if b else None for (s, e), b in zip(spans, sees)])
    causal_counts = [p - f for f, p in zip(first_causal, past_causal)]
    key_counts = [e - s for s, e in spans]
    return PaddingPlan(
        window=window,
        causal_rows=_rows(first_causal, causal_counts, seq_q, device) if any(causal_counts) else (),
        key_rows=_rows(starts, key_counts, seq_k, device),
        cu_seqlens_q=_offsets(causal_counts, device),
        cu_seqlens_k=_offsets(key_counts, device),
        max_seqlen_q=max(causal_counts),
        max_seqlen_k=max(key_counts),
        past_end_rows=_rows(past_causal, past_end, seq_q, device) if any(past_end) else (),
        cu_seqlens_past_end=_offsets(past_end, device),
        max_seqlen_past_end=max(past_end),
    )


def _rows(firsts, counts, length, device):
    """(batch indices, positions) of ``counts[b]`` consecutive positions from ``firsts[b]`` in each
    sequence of ``length`` positions, in (sequence, position) order."""
    position = torch.arange(length, device=device)
    first = torch.tensor(firsts, device=device)[:, None]
    selected = (position >= first) & (position < first + torch.tensor(counts, device=device)[:, None])
    return selected.nonzero(as_tuple=True)


def _cumulative(counts):
    total, out = 0, []
    for c in counts:
        out.append(total)
        total += c
    return out


def _offsets(counts, device):
    return torch.tensor(_cumulative(counts) + [sum(counts)], dtype=torch.int32, device=device)


def attention(plan_, query, key, value, scale, softcap):
    """Attention of q ``(batch, heads, seq_q, head_dim)``, k/v ``(batch, kv_heads, seq_k, head_dim)``
    as ``plan_`` says; returns ``(batch, seq_q, heads, head_dim)``, contiguous."""
    if plan_.dense_keys is not None:
        keys = plan_.dense_keys
        out = ops.attention(
            query, key[:, :, keys], value[:, :, keys], causal=True, scale=scale, window=plan_.window, softcap=softcap
        )
        return out.transpose(1, 2).contiguous()
    if plan_.decode_keys is not None:
        rows = [
            query.new_zeros(1, query.shape[1], 1, query.shape[3]) if keys is None else ops.attention(
                query[b : b + 1], key[b : b + 1, :, keys], value[b : b + 1, :, keys],
                causal=True, scale=scale, window=plan_.window, softcap=softcap,
            )
            for b, keys in enumerate(plan_.decode_keys)
        ]
        return torch.cat(rows).transpose(1, 2).contiguous()
    q_rows, k_rows = query.transpose(1, 2), key.transpose(1, 2)  # (batch, seq, heads, head_dim) views
    v_rows = value.transpose(1, 2)
    packed_k, packed_v = k_rows[plan_.key_rows], v_rows[plan_.key_rows]
    out = query.new_zeros(q_rows.shape)  # rows that see no key stay zero
    runs = (
        (plan_.causal_rows, plan_.cu_seqlens_q, plan_.max_seqlen_q, True, plan_.window),
        (plan_.past_end_rows, plan_.cu_seqlens_past_end, plan_.max_seqlen_past_end, False, None),
    )
    for rows, cu_seqlens_q, max_seqlen_q, causal, window in runs:
        if rows:
            packed_out = ops.varlen_attention(
                q_rows[rows], packed_k, packed_v, cu_seqlens_q, plan_.cu_seqlens_k,
                max_seqlen_q=max_seqlen_q, max_seqlen_k=plan_.max_seqlen_k,
                causal=causal, scale=scale, window=window, softcap=softcap,
            )
            out.index_put_(rows, packed_out)  # a fresh tensor: autograd records the write
    return out
