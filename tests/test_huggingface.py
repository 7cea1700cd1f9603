"""attn_implementation="fastgpt" in Hugging Face transformers: the same answers as "sdpa" (or "eager",
for soft-capped models "sdpa" cannot run), and fastgpt's attention really runs where the integration
claims it does — padded batches on its variable-length path — (tiny models from configs, no download)."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch

from attention_spy import attention_calls, varlen_attention_calls  # noqa: F401 - fixtures

import fastgpt

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'fastgpt[hf]')")

VOCAB, SEQ, LAYERS = 97, 17, 2

# name -> (config class, keyword arguments): GPT-2 (MHA, scaled attention) and Llama (GQA 4 query / 2 KV heads)
CONFIGS = {
    "gpt2": (
        transformers.GPT2Config,
        dict(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=LAYERS, n_head=4, pad_token_id=0),
    ),
    "llama": (
        transformers.LlamaConfig,
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
    ),
}

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # relative, against "sdpa" in the same dtype


def models(kind, dtype=torch.float32, **overrides):
    """The same random weights as ("fastgpt", "sdpa") models."""
    config_class, kwargs = CONFIGS[kind]
    return same_weights(config_class(**{**kwargs, **overrides}), dtype)


def same_weights(config, dtype=torch.float32):
    # each model gets its own config: from_config writes the attention implementation into it
    fast, sdpa = (
        transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name).to(dtype)
        for name in ("fastgpt", "sdpa")
    )
    sdpa.load_state_dict(fast.state_dict())
    assert fast.config._attn_implementation == "fastgpt"
    return fast.eval(), sdpa.eval()


def relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def tokens(batch, seq=SEQ):
    return torch.randint(1, VOCAB, (batch, seq))


def test_import_registers_without_importing_transformers():
    code = (
        "import sys, fastgpt\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "assert 'fastgpt' in AttentionInterface._global_mapping\n"
        "assert 'fastgpt' in AttentionMaskInterface._global_mapping\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", CONFIGS)
def test_logits_and_gradients_match_sdpa(kind, dtype, attention_calls):
    fast, sdpa = models(kind, dtype)
    ids = tokens(2)
    results = []
    for model in (fast, sdpa):
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        results.append((out.logits, grads))
    (logits, grads), (sdpa_logits, sdpa_grads) = results
    assert relative_error(logits, sdpa_logits) < TOLERANCE[dtype]
    for name, grad in grads.items():
        assert relative_error(grad, sdpa_grads[name]) < TOLERANCE[dtype] * 3, name
    assert attention_calls == [(2, 4, SEQ, 16)] * LAYERS  # GQA reaches fastgpt without repeated K/V


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", CONFIGS)
def test_greedy_generate_batch_1_matches_sdpa(kind, cache, attention_calls):
    fast, sdpa = models(kind)
    ids = tokens(1)
    # min_new_tokens: random weights may emit the end-of-sequence token early (fewer calls to count)
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation=cache)
    assert torch.equal(fast.generate(ids, **options), sdpa.generate(ids, **options))
    # prefill: every layer on fastgpt (a static cache's prefill included, its unused slots cut off)
    assert attention_calls[:LAYERS] == [(1, 4, SEQ, 16)] * LAYERS
    # decode steps too: a static cache's carry a mask (causal over the filled slots), read as such
    assert len(attention_calls) == LAYERS * 6


def test_attention_dropout_in_training_runs_sdpa_with_one_warning(monkeypatch, attention_calls):
    monkeypatch.setattr(fastgpt._huggingface, "_warned_dropout", False)
    fast, sdpa = models("llama", attention_dropout=0.5)
    fast.train(), sdpa.train()
    ids = tokens(2)
    with pytest.warns(RuntimeWarning, match="dropout") as record:
        torch.manual_seed(1)
        logits = fast(ids).logits
    torch.manual_seed(1)
    assert torch.equal(logits, sdpa(ids).logits)  # the same dropout draws: SDPA ran
    assert len(record) == 1 and attention_calls == []


def test_register_is_idempotent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastgpt._huggingface.register()
        fastgpt._huggingface.register()
    assert transformers.AttentionInterface._global_mapping["fastgpt"] is fastgpt._huggingface.attention_forward


@pytest.mark.parametrize(
    "option",
    [
        dict(position_bias=torch.randn(1, 4, SEQ, SEQ)),
        dict(output_attentions=True),
        dict(is_causal=True, kv_shorter=True),  # SDPA's top-left causal mask is not fastgpt's bottom-right one
    ],
    ids=["position_bias", "output_attentions", "fewer_keys_than_queries"],
)
def test_what_fastgpt_does_not_compute_gets_sdpa_s_answer(option, attention_calls):
    fastgpt._huggingface.register()  # as a model's import would
    sdpa_attention_forward = transformers.AttentionInterface._global_mapping["sdpa"]
    module = torch.nn.Module()
    option = dict(option)
    seq_k = SEQ - 5 if option.pop("kv_shorter", False) else SEQ
    q, k, v = torch.randn(1, 4, SEQ, 16), torch.randn(1, 2, seq_k, 16), torch.randn(1, 2, seq_k, 16)
    module.num_key_value_groups = 2
    ours, theirs = (
        forward(module, q, k, v, None, **option)[0]
        for forward in (fastgpt._huggingface.attention_forward, sdpa_attention_forward)
    )
    assert torch.equal(ours, theirs) and attention_calls == []


def test_soft_capped_call_fastgpt_cannot_run_raises(varlen_attention_calls, sdpa_fallbacks):
    # 5.24's SDPA raises for softcap itself; 4.53's would silently drop it: fastgpt raises on both
    q, k, v = torch.randn(1, 4, SEQ, 16), torch.randn(1, 2, SEQ, 16), torch.randn(1, 2, SEQ, 16)
    packed = (torch.arange(SEQ)[:, None] // 8 == torch.arange(SEQ)[None, :] // 8).tril()[None, None]
    with pytest.raises(ValueError, match="attn_implementation=.eager"):
        fastgpt._huggingface.attention_forward(gqa_module(), q, k, v, packed, softcap=30.0)
    assert sdpa_fallbacks == varlen_attention_calls == []


# ----------------------------------------------------------------------------- padded batches

LENGTHS = (SEQ, SEQ - 5, SEQ - 1, SEQ - 9)  # tokens of each row of a padded batch
# transformers 4.53's GPT-2 builds its own additive float mask; a float mask's fully masked rows (left
# padding) are not zeros in SDPA, so fastgpt leaves those calls to it
GPT2_FLOAT_MASKS = not hasattr(transformers.models.gpt2.modeling_gpt2, "create_causal_mask")


def padded_batch(side, batch=3):
    """(input_ids, attention_mask): rows of LENGTHS tokens padded on ``side`` with token 0."""
    ids = tokens(batch)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS[:batch]):
        if side == "left":
            mask[row, SEQ - length :] = 1
        else:
            mask[row, :length] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture
def sdpa_fallbacks(monkeypatch):
    """The q shapes of the calls attn_implementation="fastgpt" hands to transformers' SDPA."""
    calls = []
    real = fastgpt._huggingface._sdpa_attention_forward

    def spy(module, query, *args, **kwargs):
        calls.append(tuple(query.shape))
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(fastgpt._huggingface, "_sdpa_attention_forward", spy)
    return calls


def test_padded_batch_helper():
    ids, mask = padded_batch("left")
    assert mask.sum(1).tolist() == list(LENGTHS[:3]) and mask[:, -1].all() and not mask[1, 0]
    ids, mask = padded_batch("right")
    assert mask.sum(1).tolist() == list(LENGTHS[:3]) and mask[:, 0].all() and not mask[1, -1]
    assert (ids[mask == 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", CONFIGS)
def test_padded_batch_logits_and_gradients_match_sdpa(kind, side, dtype, varlen_attention_calls, sdpa_fallbacks):
    fast, sdpa = models(kind, dtype)
    ids, mask = padded_batch(side)
    results = []
    for model in (fast, sdpa):
        out = model(ids, attention_mask=mask, labels=ids)  # the loss over every position, padding included
        out.loss.backward()
        results.append((out.logits, {name: p.grad for name, p in model.named_parameters()}))
    (logits, grads), (sdpa_logits, sdpa_grads) = results
    assert relative_error(logits, sdpa_logits) < TOLERANCE[dtype]  # every position, padding included
    for position in range(SEQ):  # no position hides behind the others' larger logits
        assert relative_error(logits[:, position], sdpa_logits[:, position]) < TOLERANCE[dtype], position
    for name, grad in grads.items():
        assert relative_error(grad, sdpa_grads[name]) < TOLERANCE[dtype] * 3, name
    if kind == "gpt2" and side == "left" and GPT2_FLOAT_MASKS:
        assert len(sdpa_fallbacks) == LAYERS and varlen_attention_calls == []
        return
    assert sdpa_fallbacks == []
    # left padding: one call per layer; right padding: a second, non-causal one for the rows past
    # each sequence's end (they see the whole sequence in SDPA too)
    assert len(varlen_attention_calls) == LAYERS * (1 if side == "left" else 2)
    (q_shape, cu_q, cu_k, causal) = varlen_attention_calls[0]
    assert causal and q_shape == (sum(LENGTHS[:3]), 4, 16) and cu_q == cu_k == [0, 17, 29, 45]


@pytest.mark.parametrize("kind", CONFIGS)
def test_greedy_generate_left_padded_batch_of_4_matches_sdpa(
    kind, attention_calls, varlen_attention_calls, sdpa_fallbacks
):
    fast, sdpa = models(kind)
    ids, mask = padded_batch("left", batch=4)
    options = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(fast.generate(ids, **options), sdpa.generate(ids, **options))
    prefill_on_sdpa = kind == "gpt2" and GPT2_FLOAT_MASKS
    assert len(sdpa_fallbacks) == (LAYERS if prefill_on_sdpa else 0)
    if not prefill_on_sdpa:  # the prefill: the four prompts packed, no padding row computed
        assert [call[0][0] for call in varlen_attention_calls] == [sum(LENGTHS)] * LAYERS
    # every decode step: each sequence's query against its own keys, in place in the cache
    assert attention_calls == [(1, 4, 1, 16)] * (LAYERS * 5 * 4)


def mistral(window, dtype=torch.float32):
    return same_weights(transformers.MistralConfig(**CONFIGS["llama"][1], sliding_window=window), dtype)


@pytest.mark.parametrize("side", ["none", "left"])
def test_sliding_window_runs_on_fastgpt(side, attention_calls, varlen_attention_calls, sdpa_fallbacks):
    fast, sdpa = mistral(window=4)  # 17 tokens: the window hides keys from most queries
    ids, mask = padded_batch("left", batch=3) if side == "left" else (tokens(2), None)
    assert relative_error(fast(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits) < 1e-4
    assert sdpa_fallbacks == []
    # without padding the mask is the window alone: dense attention with it; with padding, varlen
    assert len(attention_calls if side == "none" else varlen_attention_calls) == LAYERS
    options = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(fast.generate(ids, **options), sdpa.generate(ids, **options))
    assert sdpa_fallbacks == []


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_qwen_left_padded_batch_runs_on_fastgpt(kind, attention_calls, varlen_attention_calls, sdpa_fallbacks):
    # Qwen2 with a window on its second layer only (use_sliding_window, max_window_layers=1); Qwen3
    # (q/k norms, no window)
    config_class = transformers.Qwen2Config if kind == "qwen2" else transformers.Qwen3Config
    window = dict(use_sliding_window=True, sliding_window=4, max_window_layers=1) if kind == "qwen2" else {}
    fast, sdpa = same_weights(config_class(**CONFIGS["llama"][1], head_dim=16, **window))
    ids, mask = padded_batch("left", batch=4)
    assert relative_error(fast(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits) < 1e-4
    assert len(varlen_attention_calls) == LAYERS
    options = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(fast.generate(ids, **options), sdpa.generate(ids, **options))
    # every decode step's queries on fastgpt: per sequence, or together once the window has left
    # the padding behind (every sequence then holds the same keys)
    assert sdpa_fallbacks == [] and sum(shape[0] for shape in attention_calls) == LAYERS * 5 * 4


def test_sliding_window_with_right_padding_goes_to_sdpa(varlen_attention_calls, sdpa_fallbacks):
    # rows past a sequence's end see its last `window` keys: not a mask varlen_attention has
    fast, sdpa = mistral(window=4)
    ids, mask = padded_batch("right")
    assert torch.equal(fast(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits)
    assert len(sdpa_fallbacks) == LAYERS and varlen_attention_calls == []


GEMMA2 = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=64, pad_token_id=0,
    sliding_window=4,  # layer 0 slides, layer 1 sees everything
    initializer_range=0.5,  # scores large enough for the cap to change them
    attn_logit_softcapping=1.0,
)


def gemma2(**overrides):
    """("fastgpt", "eager") Gemma 2 models with the same weights: "sdpa" has no soft cap."""
    config = transformers.Gemma2Config(**{**GEMMA2, **overrides})
    fast, eager = (
        transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name)
        for name in ("fastgpt", "eager")
    )
    torch.manual_seed(0)
    eager.load_state_dict(fast.state_dict())
    return fast.eval(), eager.eval()


@pytest.mark.filterwarnings("ignore:fastgpt.ops")  # soft capping runs on the reference backend
@pytest.mark.parametrize("side", ["none", "left"])
def test_gemma2_soft_cap_and_window_match_eager(side, attention_calls, varlen_attention_calls, sdpa_fallbacks):
    fast, eager = gemma2()
    ids, mask = padded_batch("left") if side == "left" else (tokens(2), None)
    logits = fast(ids, attention_mask=mask).logits
    assert sdpa_fallbacks == []
    assert len(attention_calls if side == "none" else varlen_attention_calls) == LAYERS
    expected = eager(ids, attention_mask=mask).logits
    # eager's fully masked rows (left padding) average every value where SDPA and fastgpt give
    # zeros; transformers never reads those positions (no real query sees a padded key, and their
    # labels are -100), so the comparison is over the real tokens
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert relative_error(logits[real], expected[real]) < 1e-4
    uncapped, _ = gemma2(attn_logit_softcapping=None)
    uncapped.load_state_dict(fast.state_dict())
    assert relative_error(uncapped(ids, attention_mask=mask).logits[real], expected[real]) > 1e-2  # the cap matters


# ----------------------------------------------------------------------------- the mask reader, call by call

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def gqa_module():
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = HEADS // KV_HEADS, True
    return module


def structured_mask(starts, ends, diagonal, seq_q, seq_k, window_left=None):
    """(batch, 1, seq_q, seq_k) bool: sequence b holds keys [starts[b], ends[b]); query q sees key k
    when k <= q + diagonal (and k >= q + diagonal - window_left)."""
    k = torch.arange(seq_k)
    offsets = k - torch.arange(seq_q)[:, None]
    sees = offsets <= diagonal
    if window_left is not None:
        sees &= offsets >= diagonal - window_left
    spans = (k >= torch.tensor(starts)[:, None]) & (k < torch.tensor(ends)[:, None])
    return (sees[None] & spans[:, None, :])[:, None]


def both_answers(mask, seq_q, seq_k, sliding_window=None, dtype=torch.float32):
    """fastgpt's attention_forward and transformers' SDPA on the same random tensors and ``mask``."""
    batch = mask.shape[0]
    q = torch.randn(batch, seq_q, HEADS, HEAD_DIM, dtype=dtype).transpose(1, 2)  # as transformers lays it out
    k, v = (torch.randn(batch, KV_HEADS, seq_k, HEAD_DIM, dtype=dtype) for _ in range(2))
    extra = {"sliding_window": sliding_window} if sliding_window else {}
    sdpa = transformers.AttentionInterface._global_mapping["sdpa"]
    return (
        fastgpt._huggingface.attention_forward(gqa_module(), q, k, v, mask, scaling=0.3, **extra)[0],
        sdpa(gqa_module(), q, k, v, mask, scaling=0.3)[0],
    )


# (starts, ends, diagonal, seq_q, seq_k, window_left): what transformers' masks hold
STRUCTURED = {
    "left padded prefill": ([0, 3, 9], [12, 12, 12], 0, 12, 12, None),
    "right padded prefill": ([0, 0, 0], [12, 5, 1], 0, 12, 12, None),
    "both sides": ([2, 0, 4], [10, 12, 7], 0, 12, 12, None),
    "decode step": ([0, 7, 2, 30], [31, 31, 31, 31], 30, 1, 31, None),
    "chunk after a cache": ([0, 4], [20, 20], 16, 4, 20, None),
    "static cache prefill (top-left)": ([0, 2], [6, 6], 0, 6, 16, None),
    "static cache decode": ([0, 3], [9, 9], 8, 1, 16, None),
    "window, left padded": ([0, 5, 2], [14, 14, 14], 0, 14, 14, 3),
    "window, decode": ([0, 6], [12, 12], 11, 1, 12, 4),
    "empty sequence": ([0, 0], [9, 0], 0, 9, 9, None),
    "bidirectional with padding (an encoder's mask)": ([0, 0, 3], [12, 7, 12], 11, 12, 12, None),
    "cross-attention with padded keys": ([0, 2], [20, 15], 19, 6, 20, None),
}


@pytest.mark.parametrize("case", STRUCTURED)
def test_causal_padding_masks_run_on_fastgpt_and_match_sdpa(
    case, attention_calls, varlen_attention_calls, sdpa_fallbacks
):
    starts, ends, diagonal, seq_q, seq_k, window_left = STRUCTURED[case]
    mask = structured_mask(starts, ends, diagonal, seq_q, seq_k, window_left)
    sliding_window = None if window_left is None else window_left + 1
    out, expected = both_answers(mask, seq_q, seq_k, sliding_window)
    assert relative_error(out, expected) < 1e-5 and torch.equal(out == 0, expected == 0)  # zero rows alike
    assert sdpa_fallbacks == [] and len(attention_calls) + len(varlen_attention_calls) >= 1


@pytest.mark.parametrize("case", ["left padded prefill", "right padded prefill", "decode step"])
def test_additive_float_masks_read_as_boolean(case, varlen_attention_calls, sdpa_fallbacks):
    starts, ends, diagonal, seq_q, seq_k, _ = STRUCTURED[case]
    allowed = structured_mask(starts, ends, diagonal, seq_q, seq_k)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out, expected = both_answers(mask, seq_q, seq_k)
    assert torch.equal(out, expected) if sdpa_fallbacks else relative_error(out, expected) < 1e-5
    # a float mask's fully masked rows (left padding) are not zeros in SDPA: that call stays there
    assert len(sdpa_fallbacks) == (1 if case == "left padded prefill" else 0)
    assert len(varlen_attention_calls) == (2 if case == "right padded prefill" else 0)


def packed_sequences_mask():
    block = torch.tensor([0] * 5 + [1] * 7)  # two sequences packed in one row: block-diagonal causal
    return structured_mask([0], [12], 0, 12, 12) & (block[:, None] == block[None, :])


OTHER_MASKS = {
    "packed sequences": packed_sequences_mask,
    "random": lambda: torch.rand(2, 1, 12, 12) > 0.5,
    "a hole in the padding": lambda: structured_mask([0, 0], [12, 12], 0, 12, 12).index_fill(
        3, torch.tensor([4]), False
    ),
    "a look-ahead window the kwargs do not name": lambda: structured_mask([0], [12], 2, 12, 12, window_left=4),
    "per-head mask": lambda: structured_mask([0, 3], [12, 12], 0, 12, 12).expand(2, HEADS, 12, 12),
    "a window the kwargs do not name": lambda: structured_mask([0, 3], [12, 12], 0, 12, 12, window_left=3),
}


@pytest.mark.parametrize("case", OTHER_MASKS)
def test_other_masks_go_to_sdpa(case, attention_calls, varlen_attention_calls, sdpa_fallbacks):
    mask = OTHER_MASKS[case]()
    out, expected = both_answers(mask, 12, 12)
    assert torch.equal(out, expected)
    assert len(sdpa_fallbacks) == 1 and attention_calls == varlen_attention_calls == []


@pytest.mark.parametrize("seed", range(40))
def test_any_mask_near_causal_padding_gets_sdpa_s_answer(seed):
    # random spans and diagonals, sometimes with one entry flipped: fastgpt either proves the mask
    # is causal + padding and runs it, or hands it to SDPA; the answer is SDPA's either way
    gen = torch.Generator().manual_seed(seed)
    batch, seq_q = 3, int(torch.randint(1, 10, (), generator=gen))
    seq_k = seq_q + int(torch.randint(0, 6, (), generator=gen))
    starts = torch.randint(0, seq_k, (batch,), generator=gen)
    ends = torch.minimum(starts + torch.randint(0, seq_k + 1, (batch,), generator=gen), torch.tensor(seq_k))
    diagonal = int(torch.randint(-2, seq_k, (), generator=gen))
    window_left = int(torch.randint(0, seq_k, (), generator=gen)) if seed % 3 == 0 else None
    mask = structured_mask(starts.tolist(), ends.tolist(), diagonal, seq_q, seq_k, window_left)
    if seed % 2:
        flat = mask.reshape(-1)
        i = int(torch.randint(0, flat.numel(), (), generator=gen))
        flat[i] = not flat[i]
    out, expected = both_answers(mask, seq_q, seq_k, None if window_left is None else window_left + 1)
    assert relative_error(out, expected) < 1e-5 or torch.equal(out, expected)


def test_compiled_padded_model_matches_sdpa():
    # a compiled graph has no mask values to read: padded calls go to SDPA there, without a graph break
    fast, sdpa = models("llama")
    ids, mask = padded_batch("left")
    compiled = torch.compile(fast, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert relative_error(compiled(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits) < 1e-5
