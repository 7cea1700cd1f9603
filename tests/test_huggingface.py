"""attn_implementation="fastgpt" in Hugging Face transformers: the same answers as "sdpa", and fastgpt's
attention really runs where the integration claims it does (tiny models from configs, no download)."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch

from attention_spy import attention_calls  # noqa: F401 - a fixture

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
    if cache == "dynamic":  # a static cache's decode steps carry a mask; a dynamic one's do not
        assert len(attention_calls) == LAYERS * 6


@pytest.mark.parametrize("kind", CONFIGS)
def test_greedy_generate_left_padded_batch_matches_sdpa(kind, attention_calls):
    fast, sdpa = models(kind)
    ids = tokens(3)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding, as batched generate uses
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    options = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(fast.generate(ids, **options), sdpa.generate(ids, **options))
    assert attention_calls == []  # padding masks go to SDPA until fastgpt has variable lengths


def test_right_padded_batch_matches_sdpa():
    fast, sdpa = models("llama")
    ids = tokens(2)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    assert torch.equal(fast(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits)


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


@pytest.mark.parametrize("window, accelerated", [(5, False), (64, True)])
def test_sliding_window_goes_to_sdpa_only_where_it_masks(window, accelerated, attention_calls):
    fast, sdpa = same_weights(transformers.MistralConfig(**CONFIGS["llama"][1], sliding_window=window))
    ids = tokens(1)
    assert relative_error(fast(ids).logits, sdpa(ids).logits) < TOLERANCE[torch.float32]
    assert len(attention_calls) == (LAYERS if accelerated else 0)


def test_register_is_idempotent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastgpt._huggingface.register()
        fastgpt._huggingface.register()
    assert transformers.AttentionInterface._global_mapping["fastgpt"] is fastgpt._huggingface.attention_forward


@pytest.mark.parametrize(
    "option",
    [
        dict(softcap=30.0),
        dict(position_bias=torch.randn(1, 4, SEQ, SEQ)),
        dict(output_attentions=True),
        dict(is_causal=True, kv_shorter=True),  # SDPA's top-left causal mask is not fastgpt's bottom-right one
    ],
    ids=["softcap", "position_bias", "output_attentions", "fewer_keys_than_queries"],
)
def test_what_fastgpt_does_not_compute_gets_sdpa_s_answer(option, attention_calls):
    fastgpt._huggingface.register()  # as a model's import would
    sdpa_attention_forward = transformers.AttentionInterface._global_mapping["sdpa"]
    module = torch.nn.Module()
    option = dict(option)
    seq_k = SEQ - 5 if option.pop("kv_shorter", False) else SEQ
    q, k, v = torch.randn(1, 4, SEQ, 16), torch.randn(1, 2, seq_k, 16), torch.randn(1, 2, seq_k, 16)
    module.num_key_value_groups = 2
    outcomes = []
    for forward in (fastgpt._huggingface.attention_forward, sdpa_attention_forward):
        try:
            outcomes.append(forward(module, q, k, v, None, **option)[0])
        except ValueError as exc:  # SDPA refuses softcap: so must fastgpt
            outcomes.append(str(exc))
    if isinstance(outcomes[1], str):
        assert outcomes[0] == outcomes[1]
    else:
        assert torch.equal(outcomes[0], outcomes[1])
    assert attention_calls == []
