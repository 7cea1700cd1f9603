"""fastgpt.patch_sdpa(): torch's SDPA calls routed through fastgpt, same answers, and exactly what was
there before restored afterwards."""

import threading

import pytest
import torch
import torch.nn.functional as F

from attention_spy import attention_calls  # noqa: F401 - a fixture

import fastgpt
from fastgpt import patching

TORCH_SDPA = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def unpatched_before_and_after():
    assert F.scaled_dot_product_attention is TORCH_SDPA
    yield
    fastgpt.unpatch_sdpa()
    assert F.scaled_dot_product_attention is TORCH_SDPA, "a test left torch's SDPA patched"


class NanoAttention(torch.nn.Module):
    """nanoGPT's causal self-attention: one qkv projection, then F.scaled_dot_product_attention."""

    def __init__(self, width=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


def output_and_gradients(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_nanogpt_outputs_and_gradients_unchanged_and_routed(attention_calls):
    model, x = NanoAttention(), torch.randn(3, 19, 32)
    expected_out, expected_grads = output_and_gradients(model, x)
    with fastgpt.patch_sdpa():
        out, grads = output_and_gradients(model, x)
    assert_close(out, expected_out)
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name])
    assert attention_calls == [(3, 4, 19, 8)]


def test_what_fastgpt_does_not_accelerate_reaches_torch_once(attention_calls):
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    mask = torch.rand(9, 9) > 0.3
    with fastgpt.patch_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # no recursion back into fastgpt
    assert torch.equal(out, TORCH_SDPA(q, k, v, attn_mask=mask))
    assert attention_calls == []


def test_another_librarys_patch_is_what_fastgpt_falls_back_to_and_is_restored(monkeypatch):
    seen = []

    def other_library(query, key, value, **kwargs):
        seen.append(kwargs.get("attn_mask") is not None)
        return TORCH_SDPA(query, key, value, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", other_library)
    q = torch.randn(1, 2, 5, 8)
    with fastgpt.patch_sdpa():
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    assert F.scaled_dot_product_attention is other_library
    assert seen == [True]
    monkeypatch.undo()


def test_a_patch_installed_over_fastgpts_is_left_in_place():
    fastgpt.patch_sdpa()

    def later_library(*args, **kwargs):
        return TORCH_SDPA(*args, **kwargs)

    F.scaled_dot_product_attention = later_library  # not monkeypatch: its undo would put fastgpt's patch back
    try:
        with pytest.warns(RuntimeWarning, match="replaced after"):
            fastgpt.unpatch_sdpa()
        assert F.scaled_dot_product_attention is later_library
    finally:
        F.scaled_dot_product_attention = TORCH_SDPA


def test_nested_blocks_and_repeated_plain_calls():
    with fastgpt.patch_sdpa():
        with fastgpt.patch_sdpa():
            assert patching.is_sdpa_patched()
        assert patching.is_sdpa_patched()  # the outer block still holds it
        fastgpt.unpatch_sdpa()  # releases plain calls only: the block's hold stays
        assert patching.is_sdpa_patched()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    fastgpt.patch_sdpa()
    fastgpt.patch_sdpa()
    fastgpt.unpatch_sdpa()  # idempotent: one unpatch undoes any number of plain patches
    assert F.scaled_dot_product_attention is TORCH_SDPA
    fastgpt.unpatch_sdpa()  # unpatching an unpatched process does nothing
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_concurrent_blocks_in_threads():
    model, x = NanoAttention(), torch.randn(2, 11, 32)
    expected = model(x).detach()
    failures, start = [], threading.Barrier(6)

    def worker():
        start.wait()
        for _ in range(20):
            with fastgpt.patch_sdpa():
                if not patching.is_sdpa_patched():
                    failures.append("not patched inside a block")
                out = model(x).detach()
                if not torch.allclose(out, expected, rtol=1e-4, atol=1e-5):
                    failures.append("wrong output")

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_torch_compile_full_graph_through_the_patch():
    torch._dynamo.reset()
    model, x = NanoAttention(), torch.randn(2, 13, 32)
    expected = model(x)
    with fastgpt.patch_sdpa():
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert_close(compiled(x), expected)
        graph = torch._dynamo.explain(model)(x)
    assert graph.graph_break_count == 0
    assert any("fastgpt.attention" in str(node.target) for g in graph.graphs for node in g.graph.nodes)
