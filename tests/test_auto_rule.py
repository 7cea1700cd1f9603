"""auto's measured rule: buckets, device classes, where tables are read from, and the tuner."""

import json

import pytest
import torch

from fastgpt import auto_rule, dispatch, ops, registry
from fastgpt.bench import tune


@pytest.fixture
def fresh_decisions(monkeypatch, tmp_path):
    """No user table (an empty cache folder), decisions and tables forgotten before and after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTGPT_AUTO_TABLE", raising=False)
    dispatch.forget_decisions()
    yield
    dispatch.forget_decisions()


def write_table(path, choices):
    path.write_text(json.dumps({"schema": auto_rule.SCHEMA, "choices": {k: {"backend": v} for k, v in choices.items()}}))
    return path


def qkv(seq_q, seq_k, head_dim=64, requires_grad=False):
    q = torch.randn(1, 2, seq_q, head_dim, requires_grad=requires_grad)
    k, v = (torch.randn(1, 2, seq_k, head_dim, requires_grad=requires_grad) for _ in range(2))
    return q, k, v


def test_buckets_name_the_kind_of_call():
    q, k, _ = qkv(1, 100)
    assert auto_rule.attention_bucket(q, k, training=False) == "attention/float32/infer/decode/d64"
    q, k, _ = qkv(600, 600, head_dim=80)
    assert auto_rule.attention_bucket(q, k, training=True) == "attention/float32/train/long/d128"
    x = torch.randn(3, 5, 1024, dtype=torch.bfloat16)
    assert auto_rule.add_layer_norm_bucket(x, training=True) == "add_layer_norm/bfloat16/train/few/h2048"
    assert auto_rule.add_layer_norm_bucket(torch.randn(100, 8192), training=False) == "add_layer_norm/float32/infer/many/wide"


def test_device_class_names_the_cpu():
    cls = auto_rule.device_class("cpu")
    assert cls.startswith("cpu-") and cls == cls.lower()
    assert auto_rule.device_class("meta") == "meta"


def test_a_table_decides_which_backend_auto_runs(fresh_decisions, monkeypatch, tmp_path):
    q, k, v = qkv(1, 64)
    bucket = auto_rule.attention_bucket(q, k, training=False)
    for chosen, module in (("torch", "fastgpt.torch_kernels"), ("native", "fastgpt.native")):
        if not registry.get(chosen).availability()[0]:
            pytest.skip(f"the {chosen} backend is not available here")
        monkeypatch.setenv("FASTGPT_AUTO_TABLE", str(write_table(tmp_path / f"{chosen}.json", {bucket: chosen})))
        dispatch.forget_decisions()
        assert dispatch.resolve("attention", "auto", (q, k, v), training=False).__name__ == module
        # the same call with a backward to follow is another bucket, which this table leaves out
        assert auto_rule.preferred_backend("attention", (q, k, v), True) is None


def test_training_calls_are_looked_up_as_training(fresh_decisions, monkeypatch):
    seen = []
    monkeypatch.setattr(auto_rule, "preferred_backend", lambda op, args, training: seen.append(training))
    q, k, v = qkv(5, 5, requires_grad=True)
    ops.attention(q, k, v).sum().backward()
    with torch.no_grad():
        ops.attention(q, k, v)
    assert seen == [True, False]


def test_an_unknown_device_class_gets_the_registry_order(fresh_decisions, monkeypatch):
    monkeypatch.setattr(auto_rule, "device_class", lambda device_type, index=None: "cpu-from-the-future")
    q, k, v = qkv(1, 64)
    assert auto_rule.load("cpu-from-the-future") == (None, None)
    assert auto_rule.preferred_backend("attention", (q, k, v), False) is None
    first = next(b for b in registry.auto_candidates("cpu") if dispatch.unsupported_reason("attention", b.name, (q, k, v)) is None)
    assert dispatch.resolve("attention", "auto", (q, k, v), training=False) is first.module("attention")


def test_a_backend_the_table_names_must_still_support_the_inputs(fresh_decisions, monkeypatch, tmp_path):
    x = torch.randn(4, 1)  # torch's layer_norm backward is inaccurate for hidden 1: the torch backend declines it
    bucket = auto_rule.add_layer_norm_bucket(x, training=True)
    monkeypatch.setenv("FASTGPT_AUTO_TABLE", str(write_table(tmp_path / "t.json", {bucket: "torch"})))
    args = (x, x, None, None)
    assert dispatch.unsupported_reason("add_layer_norm", "torch", args) is not None
    assert dispatch.resolve("add_layer_norm", "auto", args, training=True).__name__ != "fastgpt.torch_kernels"


def test_bad_tables_are_clear_errors(fresh_decisions, monkeypatch, tmp_path):
    q, k, v = qkv(1, 8)
    monkeypatch.setenv("FASTGPT_AUTO_TABLE", str(tmp_path / "missing.json"))
    with pytest.raises(auto_rule.TableError, match="FASTGPT_AUTO_TABLE names .*missing.json"):
        ops.attention(q, k, v)
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "something else"}')
    monkeypatch.setenv("FASTGPT_AUTO_TABLE", str(bad))
    dispatch.forget_decisions()
    with pytest.raises(auto_rule.TableError, match="bad.json: not a fastgpt auto table"):
        ops.attention(q, k, v)


def test_the_user_table_comes_before_the_shipped_one(fresh_decisions, tmp_path):
    cls = auto_rule.device_class("cpu")
    user = auto_rule.user_table_path(cls)
    assert user.startswith(str(tmp_path))
    assert auto_rule.table_paths(cls) == [user, auto_rule.shipped_table_path(cls)]


def test_the_tuner_writes_a_table_auto_reads(fresh_decisions, monkeypatch, tmp_path):
    lines = []
    table = tune.tune("cpu", dtypes=[torch.float32], sizes="tiny", budget_s=0.002, log=lines.append)
    assert table["choices"] and len(lines) >= len(table["choices"])
    candidates = {b.name for b in registry.auto_candidates("cpu")}
    for key, choice in table["choices"].items():
        assert choice["backend"] in candidates, key
        assert choice["speedup_vs_torch"] >= 1.0
    path = tune.write_table(table, str(tmp_path / "tuned.json"))
    monkeypatch.setenv("FASTGPT_AUTO_TABLE", path)
    assert auto_rule.load(cls := auto_rule.device_class("cpu"))[0]["choices"] == table["choices"], cls


def test_typical_choices_name_registered_backends(fresh_decisions):
    rows = auto_rule.typical_choices("cpu", torch.float32)
    assert len(rows) == len(auto_rule.TYPICAL_CALLS)
    for op, description, bucket, backend in rows:
        assert bucket.startswith(op + "/float32/") and description
        assert backend in registry.names()


def test_a_growing_kv_cache_is_decided_once(fresh_decisions, monkeypatch):
    asked = []
    monkeypatch.setattr(auto_rule, "preferred_backend", lambda op, args, training: asked.append(args[1].shape[2]))
    q = torch.randn(1, 4, 1, 16)
    cache = torch.randn(1, 2, 40, 16)
    for length in range(10, 30):
        ops.attention(q, cache[:, :, :length], cache[:, :, :length])
    assert asked == [10]
    ops.attention(torch.randn(1, 4, 8, 16), cache, cache)  # a prefill is another bucket
    assert asked == [10, 40]


def test_bench_tune_writes_the_table_auto_reads(fresh_decisions, monkeypatch, tmp_path, capsys):
    from fastgpt.bench.cli import main

    path = tmp_path / "tuned.json"
    assert main(["--tune", "--sizes", "tiny", "--dtype", "fp32", "--tune-out", str(path)]) == 0
    table = auto_rule.read_table(str(path))
    assert table["command"].startswith("fastgpt bench --tune") and table["choices"]
    assert f"wrote {path}" in capsys.readouterr().out
    assert main(["--tune", "--tune-out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
