"""The GPT: shapes, the causal property, the KV cache, backends agreeing, and learning."""

import warnings

import pytest
import torch

from fastgpt.nn import GPT, GPTConfig, KVCache, sample_next_token

TINY = dict(vocab_size=256, context_length=32, n_layers=2, n_heads=4, d_model=32)
VARIANTS = [
    {},
    {"norm_position": "pre"},
    {"pos_encoding": "learned", "activation": "gelu", "tie_weights": True},
    {"n_kv_heads": 1, "norm_position": "pre"},
    {"n_kv_heads": 2, "d_ff": 48},
]


def tiny_model(backend="reference", **overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides}), backend=backend).eval()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()) or "default")
def test_shapes_causality_and_cache(variant):
    model = tiny_model(**variant)
    idx = torch.randint(0, 256, (3, 20))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 20, 256) and loss.shape == ()

    # changing a later token leaves every earlier position's logits unchanged
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 256
    logits_changed, _ = model(changed)
    assert torch.equal(logits[:, :12], logits_changed[:, :12])
    assert not torch.allclose(logits[:, 12:], logits_changed[:, 12:])

    # feeding the tokens through a KV cache in chunks reproduces the full forward pass
    cache = KVCache(model.config, 3, "cpu", torch.float32)
    pieces = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 7), (7, 8), (8, 20))]
    torch.testing.assert_close(torch.cat(pieces, 1), logits, rtol=1e-4, atol=1e-5)


def test_last_only_gives_the_last_positions_logits_and_generate_uses_it(monkeypatch):
    model = tiny_model()
    idx = torch.randint(0, 256, (3, 20))
    full, _ = model(idx)
    last, loss = model(idx, last_only=True)
    assert last.shape == (3, 1, 256) and loss is None
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="last_only"):
        model(idx, idx, last_only=True)

    widths = []
    lm_head = model.lm_head.forward
    monkeypatch.setattr(model.lm_head, "forward", lambda x: widths.append(x.shape[1]) or lm_head(x))
    model.generate(idx, 3, temperature=0)
    assert widths == [1, 1, 1]  # the prompt's pass too


def test_backends_agree_with_plain_torch():
    reference = tiny_model(norm_position="pre", n_kv_heads=2)
    baseline = tiny_model(norm_position="pre", n_kv_heads=2, backend="torch")
    baseline.load_state_dict(reference.state_dict())
    idx = torch.randint(0, 256, (2, 17))
    torch.testing.assert_close(reference(idx)[0], baseline(idx)[0], rtol=1e-4, atol=1e-5)


def test_tied_weights_are_one_parameter():
    model = tiny_model(tie_weights=True)
    assert model.lm_head.weight is model.token_embedding.weight
    assert model.num_parameters() == tiny_model().num_parameters() - 256 * 32


def test_loss_falls_on_a_repeating_pattern():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.tensor(list(b"abcdefgh" * 8))[None, :33].repeat(4, 1)
    losses = []
    for _ in range(30):
        _, loss = model(data[:, :-1], data[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_generate_extends_past_the_context_length():
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, 70, temperature=0.9, top_k=5, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 75) and torch.equal(out[:, :5], prompt)
    greedy = model.generate(prompt, 3, temperature=0)
    expected = model(prompt)[0][:, -1].argmax(-1)
    assert torch.equal(greedy[:, 5], expected)


def test_top_k_only_samples_the_best():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(200, 1)
    tokens = sample_next_token(logits, 1.0, 2, torch.Generator().manual_seed(0))
    assert set(tokens.flatten().tolist()) == {1, 2}


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"d_model": 30}, "divisible by n_heads"),
        ({"n_kv_heads": 3}, "multiple of n_kv_heads"),
        ({"norm_position": "middle"}, "norm_position"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**TINY, **bad})


def test_bad_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        GPT(GPTConfig(**TINY), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        tiny_model().set_backend("cuda")


def test_backend_is_chosen_at_run_time_not_stored():
    model = tiny_model(backend="torch")
    assert model.backend == "torch" and "backend" not in model.config.to_dict()
    assert model.set_backend("reference") is model and model.backend == "reference"
    old_checkpoint_config = {**model.config.to_dict(), "backend": "native"}  # written before the field left
    assert GPTConfig.from_dict(old_checkpoint_config) == model.config


def test_use_backend_picks_the_backend_of_auto(monkeypatch):
    import fastgpt
    from fastgpt import dispatch

    model = tiny_model(backend="auto")
    picked = []
    real_resolve = dispatch.resolve
    monkeypatch.setattr(dispatch, "resolve", lambda op, backend, *args, **kwargs: picked.append(backend) or real_resolve(op, backend, *args, **kwargs))
    idx = torch.randint(0, 256, (1, 5))
    with fastgpt.use_backend("reference"):
        with fastgpt.use_backend("torch"):
            model(idx)
        assert set(picked) == {"torch"}
        picked.clear()
        model(idx)
    assert set(picked) == {"reference"}
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastgpt.use_backend("nonsense"):
            pass


def test_too_long_input_raises():
    with pytest.raises(ValueError, match="exceeds context_length"):
        tiny_model()(torch.zeros(1, 33, dtype=torch.long))


def test_default_backend_runs_without_error():
    model = tiny_model(backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto may fall back where no fast backend is built
        logits, _ = model(torch.randint(0, 256, (1, 9)))
    assert torch.isfinite(logits).all()
