"""The backend registry: one entry adds a backend everywhere (ops, auto, the shared suites)."""

import dataclasses

import pytest
import torch
import wrapper_backend
from conftest import BACKENDS

import fastgpt
from fastgpt import ops, registry


@pytest.fixture
def install():
    """Register backends for one test (replacing any of the same name) through the public API, so
    ops forget their decisions, and put the registry back afterwards the same way."""
    saved = dict(registry._BACKENDS)
    yield lambda backend: registry.register_backend(backend, replace=True)
    for name in registry.names():
        if name not in saved:
            registry.unregister_backend(name)
        elif registry.get(name) is not saved[name]:
            registry.register_backend(saved[name], replace=True)


def test_built_in_backends_and_auto_order():
    assert registry.names()[:4] == ("triton", "native", "torch", "reference")
    assert [b.name for b in registry.auto_candidates("cuda")] == ["triton", "native", "torch"]
    assert [b.name for b in registry.auto_candidates("cpu")] == ["native", "torch"]
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


def test_auto_tries_a_backend_registered_for_the_device(install):
    install(registry.Backend("first_on_cpu", {"attention": "wrapper_backend"}, lambda: (True, "test"), auto_devices=("cpu",)))
    assert [b.name for b in registry.auto_candidates("cpu")] == ["native", "torch", "first_on_cpu"]
    for name in ("native", "torch"):
        install(dataclasses.replace(registry.get(name), availability=lambda: (False, "switched off")))
    before = wrapper_backend.calls["attention_forward"]
    ops.attention(torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8))
    assert wrapper_backend.calls["attention_forward"] == before + 1


def test_a_backend_without_an_op_declines_it(install):
    install(registry.Backend("only_attention", {"attention": "wrapper_backend"}, lambda: (True, "test")))
    x = torch.randn(2, 8)
    with pytest.raises(fastgpt.BackendError, match="does not implement add_layer_norm"):
        ops.add_layer_norm(x, x, backend="only_attention")


def test_unavailable_backend_says_why(install):
    install(registry.Backend("missing", {"attention": "no.such.module"}, lambda: (False, "not installed here")))
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


def test_backends_declare_their_attention_variants():
    def backend(variants, modules=None):
        return registry.Backend("mine", modules or {"attention": "wrapper_backend"}, lambda: (True, ""), variants=variants)

    assert backend(()).variants == frozenset()  # what a backend that says nothing implements
    assert backend(["window", "varlen"]).variants == {"window", "varlen"}
    assert backend({"window"}).missing_variants({"window"}) is None
    assert backend({"window"}).missing_variants({"softcap", "varlen"}) == (
        "the mine backend has no soft-capping or variable-length (packed) kernel"
    )
    with pytest.raises(ValueError, match="Backend.variants must name some of"):
        backend({"windows"})
    with pytest.raises(ValueError, match="for a backend with attention"):
        backend({"window"}, modules={"add_layer_norm": "wrapper_backend"})
    with pytest.raises(TypeError, match="the string 'window'"):
        backend("window")
