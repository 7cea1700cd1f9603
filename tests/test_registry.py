"""The backend registry: one entry adds a backend everywhere (ops, auto, the shared suites)."""

import dataclasses

import pytest
import torch
import wrapper_backend
from conftest import BACKENDS

import fastgpt
from fastgpt import ops, registry


def test_built_in_backends_and_auto_order():
    assert registry.names()[:4] == ("triton", "native", "torch", "reference")
    assert [b.name for b in registry.auto_candidates("cuda")] == ["triton", "native"]
    assert [b.name for b in registry.auto_candidates("cpu")] == ["native"]
    assert registry.choices()[0] == "auto"


def test_a_registered_backend_runs_through_the_public_ops():
    assert wrapper_backend.NAME in BACKENDS  # so every shared parametrized suite runs on it
    assert fastgpt.backends()[wrapper_backend.NAME]["available"]
    before = dict(wrapper_backend.calls)
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    ops.attention(q, q, q, backend=wrapper_backend.NAME).sum().backward()
    x = torch.randn(3, 8, requires_grad=True)
    y, _ = ops.add_layer_norm(x, x, backend=wrapper_backend.NAME)
    y.sum().backward()
    for name in ("attention_forward", "attention_backward", "add_layer_norm_forward", "add_layer_norm_backward"):
        assert wrapper_backend.calls[name] == before.get(name, 0) + 1, name


def test_auto_tries_a_backend_registered_for_the_device(monkeypatch):
    monkeypatch.setitem(
        registry._BACKENDS,
        "first_on_cpu",
        registry.Backend("first_on_cpu", {"attention": "wrapper_backend"}, lambda: (True, "test"), auto_devices=("cpu",)),
    )
    assert [b.name for b in registry.auto_candidates("cpu")] == ["native", "first_on_cpu"]
    native_off = dataclasses.replace(registry.get("native"), availability=lambda: (False, "switched off"))
    monkeypatch.setitem(registry._BACKENDS, "native", native_off)
    before = wrapper_backend.calls["attention_forward"]
    ops.attention(torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8))
    assert wrapper_backend.calls["attention_forward"] == before + 1


def test_a_backend_without_an_op_declines_it(monkeypatch):
    only_attention = registry.Backend("only_attention", {"attention": "wrapper_backend"}, lambda: (True, "test"))
    monkeypatch.setitem(registry._BACKENDS, "only_attention", only_attention)
    x = torch.randn(2, 8)
    with pytest.raises(fastgpt.BackendError, match="does not implement add_layer_norm"):
        ops.add_layer_norm(x, x, backend="only_attention")


def test_unavailable_backend_says_why(monkeypatch):
    missing = registry.Backend("missing", {"attention": "no.such.module"}, lambda: (False, "not installed here"))
    monkeypatch.setitem(registry._BACKENDS, "missing", missing)
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(fastgpt.BackendError, match="not installed here"):
        ops.attention(q, q, q, backend="missing")
    assert fastgpt.backends()["missing"] == {"available": False, "reason": "not installed here"}


def test_registration_errors():
    with pytest.raises(ValueError, match="already registered"):
        registry.register_backend(registry.Backend("native", {"attention": "fastgpt.native"}, lambda: (True, "")))
    with pytest.raises(ValueError, match="cannot be unregistered"):
        registry.unregister_backend(registry.FALLBACK)
    with pytest.raises(KeyError, match="no backend named"):
        registry.unregister_backend("nonsense")
    with pytest.raises(ValueError, match="other than 'auto'"):
        registry.Backend("auto", {"attention": "x"}, lambda: (True, ""))
    with pytest.raises(ValueError, match="Backend.modules"):
        registry.Backend("mine", {"softmax": "x"}, lambda: (True, ""))
    with pytest.raises(TypeError, match="fastgpt.registry.Backend"):
        registry.register_backend("mine")


def test_register_and_unregister_round_trip():
    backend = registry.Backend("temporary", {"attention": "wrapper_backend"}, lambda: (True, "test"))
    registry.register_backend(backend)
    try:
        assert registry.names()[-1] == "temporary" and "temporary" in registry.choices()
    finally:
        registry.unregister_backend("temporary")
    assert "temporary" not in registry.names()
